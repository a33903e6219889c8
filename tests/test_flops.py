"""Model-FLOPs utilisation: the FLOP counts of the tiny configs (counted by hand from their shapes), the peak table,
and the stage record's entries."""

import pytest
import torch
from conftest import build_tiny

from sparsekd_deploy.core import flops
from sparsekd_deploy.core.flops import Utilisation, forward_flops_per_token, kd_step_flops_per_token, peak_flops


def test_llama_forward_flops_by_hand():
    # hidden 32, 4 heads × 8, 2 KV heads, intermediate 64, 2 layers, vocab 256, untied head:
    # per layer q 32·32 + k 32·16 + v 32·16 + o 32·32 + gate/up/down 3 · 32·64 = 9216; head 256·32 = 8192
    n = 2 * 9216 + 8192
    assert forward_flops_per_token(build_tiny("llama"), 16) == 2 * n + 4 * 2 * 32 * 16


def test_gpt2_conv1d_weights_count():
    # c_attn 32·96 + c_proj 32·32 + c_fc 32·64 + mlp c_proj 64·32 = 8192 per layer; the head is tied to the embeddings
    # but still a multiply
    n = 2 * 8192 + 256 * 32
    assert forward_flops_per_token(build_tiny("gpt2"), 8) == 2 * n + 4 * 2 * 32 * 8


def test_kd_step_counts_the_teacher_only_when_it_runs():
    model = build_tiny("llama")
    fwd = forward_flops_per_token(model, 16)
    assert kd_step_flops_per_token(model, None, 16) == 3 * fwd
    assert kd_step_flops_per_token(model, model, 16) == 4 * fwd


@pytest.mark.parametrize("name, tflops", [("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4),
                                          ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                          ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0),
                                          ("NVIDIA L4", 121.0), ("NVIDIA A10G", 70.0),
                                          ("NVIDIA GH200 480GB", 989.4)])
def test_peak_table(monkeypatch, name, tflops):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    assert peak_flops(name)[0] == pytest.approx(tflops * 1e12)
    if "GH200" in name:  # not taken for an H200 by the substring match
        assert peak_flops(name)[1] == "datasheet peak of GH200"


def test_unknown_device_and_override(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    peak, why = peak_flops("Orin (nvgpu)")
    assert peak is None and flops.PEAK_ENV in why
    monkeypatch.setenv(flops.PEAK_ENV, "42.5")
    assert peak_flops("Orin (nvgpu)") == (42.5e12, flops.PEAK_ENV)
    monkeypatch.setenv(flops.PEAK_ENV, "fast")
    assert peak_flops("NVIDIA H200")[0] is None


def test_record_entries():
    u = Utilisation(flops_per_token=1e10, peak=989.4e12, source="datasheet peak of H200")
    rec = u.record(40_000.0)
    assert rec == {"mfu": pytest.approx(0.4043, abs=1e-4), "model_tflops_per_second": 400.0,
                   "mfu_peak": "datasheet peak of H200"}
    assert Utilisation(1e10, None, "no peak known").record(40_000.0)["mfu"] is None


def test_cuda_only(monkeypatch):
    assert Utilisation.for_run(torch.device("cpu"), build_tiny("llama"), None, 16, 1) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    u = Utilisation.for_run(torch.device("cuda", 0), build_tiny("llama"), None, 16, world=2)
    assert u.peak == pytest.approx(2 * 756e12)  # the run's GPUs together
    fp32 = Utilisation.for_run(torch.device("cuda", 0), build_tiny("llama"), None, 16, 1, mixed_precision="no")
    assert fp32.peak is None and "fp32" in fp32.source and fp32.record(1000.0)["mfu"] is None
