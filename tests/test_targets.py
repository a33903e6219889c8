import numpy as np
import pytest
import torch

from sparsekd_deploy.targets.base import TargetError, next_token_distribution
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget, provider_config


def test_top_k_and_top_p_filtering():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    p = next_token_distribution(logits, 1.0, top_k=2)
    np.testing.assert_allclose(p, [[0.625, 0.375, 0, 0]], atol=1e-9)
    p = next_token_distribution(logits, 1.0, top_p=0.75)
    np.testing.assert_allclose(p, [[0.625, 0.375, 0, 0]], atol=1e-9)
    p = next_token_distribution(logits, 1.0, top_p=0.81)
    np.testing.assert_allclose(p, [[0.5, 0.3, 0.15, 0]] / np.float64(0.95), atol=1e-9)
    cold = next_token_distribution(logits, 0.1)
    assert cold[0, 0] > 0.99


def test_missing_provider_is_a_clear_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(TargetError, match="not available in onnxruntime .*onnxruntime-gpu"):
        provider_config("cuda")
    with pytest.raises(TargetError, match="unknown provider"):
        provider_config("npu")


def test_ort_matches_pytorch(exported):
    model, onnx_path = exported["llama"]
    t = OnnxRuntimeTarget(onnx_path, max_positions=64)
    assert t.has_kv_cache
    ids = np.random.default_rng(0).integers(0, 256, (3, 12))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(t.logits(ids) - ref).max() <= 1e-4
    greedy = t.generate(ids, 8).tokens
    hf = model.generate(torch.from_numpy(ids), attention_mask=torch.ones(3, 12, dtype=torch.long), max_new_tokens=8,
                        do_sample=False, pad_token_id=0)[:, 12:].numpy()
    np.testing.assert_array_equal(greedy, hf)
    a = t.generate(ids, 8, temperature=1.0, top_k=50, top_p=0.9, seeds=[1, 2, 3])
    b = t.generate(ids, 8, temperature=1.0, top_k=50, top_p=0.9, seeds=[1, 2, 3])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.entropies > 0).all()


def test_target_input_checks(exported):
    _, onnx_path = exported["llama"]
    t = OnnxRuntimeTarget(onnx_path, max_positions=64)
    with pytest.raises(TargetError, match="exceeds the model's 64 positions"):
        t.logits(np.zeros((1, 65), dtype=np.int64))
    with pytest.raises(TargetError, match="exceeds"):
        t.generate(np.zeros((1, 60), dtype=np.int64), 10)
    with pytest.raises(TargetError, match=r"\[batch, sequence\]"):
        t.logits(np.zeros(5, dtype=np.int64))
    with pytest.raises(TargetError, match="token ids must lie"):
        t.logits(np.full((1, 3), 999))
    with pytest.raises(TargetError, match="seeds"):
        t.generate(np.zeros((2, 3), dtype=np.int64), 2, temperature=1.0, seeds=[1])
