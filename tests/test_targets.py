import numpy as np
import pytest
import torch

from sparsekd_deploy.targets.base import TargetError
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget, provider_config

# The sampling distribution (temperature, top-k, top-p) is numerics.next_token_distribution: tests/test_numerics.py.


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


def test_engine_profile_limits_chunk_rows_and_refuse_long_shapes(exported):
    # A TensorRT engine accepts only its profile's shapes; the Target base class runs extra rows in chunks
    # (same tokens: each row keeps its own seed) and refuses longer prompts/pasts with a rebuild hint.
    from sparsekd_deploy.targets.base import ShapeLimits

    _, onnx_path = exported["llama"]
    free = OnnxRuntimeTarget(onnx_path, max_positions=64)
    capped = OnnxRuntimeTarget(onnx_path, max_positions=64)
    capped.limits = ShapeLimits.from_profile({"batch": {"min": 1, "opt": 1, "max": 2},
                                              "seq": {"min": 1, "opt": 8, "max": 16},
                                              "past": {"min": 0, "opt": 8, "max": 20}})
    assert capped.limits == ShapeLimits(2, 16, 20)
    calls = []
    forward = capped._forward
    capped._forward = lambda ids, past, n: calls.append(ids.shape[0]) or forward(ids, past, n)
    ids = np.random.default_rng(1).integers(0, 256, (5, 12))
    np.testing.assert_allclose(capped.logits(ids), free.logits(ids), atol=1e-6)
    assert calls == [2, 2, 1]
    a = capped.generate(ids, 6, temperature=1.0, seeds=[5, 6, 7, 8, 9])
    b = free.generate(ids, 6, temperature=1.0, seeds=[5, 6, 7, 8, 9])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert max(calls[3:]) == 2
    np.testing.assert_array_equal(capped.generate(ids, 4).tokens, free.generate(ids, 4).tokens)
    with pytest.raises(TargetError, match="sequence max 16: rebuild the engine with --seq 1,OPT,17"):
        capped.logits(np.zeros((1, 17), dtype=np.int64))
    with pytest.raises(TargetError, match="past max is 20: rebuild the engine with --past 0,OPT,22"):
        capped.generate(ids, 12)
    with pytest.raises(TargetError, match="batch, sequence ≥ 1"):
        capped.logits(np.zeros((0, 3), dtype=np.int64))
