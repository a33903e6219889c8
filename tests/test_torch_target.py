"""The torch target: dense on CPU here (same interface), the 2:4 swap where CUDA exists."""

import numpy as np
import pytest
import torch

from sparsekd_deploy.targets.base import TargetError, make_target
from sparsekd_deploy.targets.torch_cuda import semi_structured_ok


def test_torch_target_cpu_matches_hf(pruned_dirs):
    t = make_target("torch", pruned_dirs["llama"], device="cpu", dtype="fp32", sparse=False)
    ids = np.random.default_rng(0).integers(0, 256, (2, 6))
    with torch.no_grad():
        ref = t.model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(t.logits(ids), ref, atol=1e-5)
    hf = t.model.generate(torch.from_numpy(ids), attention_mask=torch.ones(2, 6, dtype=torch.long), max_new_tokens=5,
                          do_sample=False, pad_token_id=0)[:, 6:].numpy()
    np.testing.assert_array_equal(t.generate(ids, 5).tokens, hf)


def test_torch_target_refusals(pruned_dirs):
    with pytest.raises(TargetError, match="only on CUDA"):
        make_target("torch", pruned_dirs["llama"], device="cpu", sparse=True)
    with pytest.raises(TargetError, match="dtype"):
        make_target("torch", pruned_dirs["llama"], device="cpu", sparse=False, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(TargetError, match="need a CUDA GPU"):
            make_target("torch", pruned_dirs["llama"])


def test_semi_structured_eligibility():
    w = torch.randn(64, 128)
    w.view(-1, 4)[:, :2] = 0
    assert semi_structured_ok(w) is None
    assert semi_structured_ok(torch.randn(64, 128)) == "not 2:4 along in_features"
    small = torch.randn(32, 32)
    small.view(-1, 4)[:, :2] = 0
    assert "multiple of 64" in semi_structured_ok(small)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_matches_dense_on_gpu():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("2:4 sparse tensor cores need compute capability ≥ 8.0")
    from torch import nn

    from sparsekd_deploy.targets.torch_cuda import to_semi_structured

    lin = nn.Linear(256, 512, bias=False).half().cuda()
    with torch.no_grad():
        lin.weight.view(-1, 4)[:, :2] = 0
    model = nn.Sequential(lin)
    x = torch.randn(128, 256, dtype=torch.half, device="cuda")
    dense = model(x)
    assert to_semi_structured(model, skip=()) == {"0": "sparse"}
    torch.testing.assert_close(model(x), dense, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_build_torch_target_end_to_end_on_gpu(tmp_path):
    """`build --target torch` on a GPU: distilled on CUDA, validated on the torch target with its Linear layers on the
    2:4 kernels (the model is wide enough for them: every dimension a multiple of 64), and the gates pass."""
    import json

    import transformers as tf
    from conftest import cli_build, tiny_tokenizer

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("2:4 sparse tensor cores need compute capability ≥ 8.0")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2)
    teacher = tmp_path / "teacher"
    tf.LlamaForCausalLM(cfg).save_pretrained(teacher, safe_serialization=True)
    tiny_tokenizer().save_pretrained(teacher)
    out = cli_build(teacher, tmp_path / "b", "--target", "torch", "--run-dir", str(tmp_path / "run")).stdout
    res = json.loads(out[out.index("{"):])
    v = res["validation"]
    assert v["runtime"]["runtime"] == "torch" and v["runtime"]["provider"] == "cuda"
    assert v["runtime"]["sparse_layers"] == 2 * 7, v["runtime"]  # q k v o gate up down per layer; lm_head stays dense
    assert v["passed"], v["gates"]
