"""Quantization-aware distillation (``--qat-steps``, core/qat.py): the fake-quantized forward, the QAT stage of a
seeded tiny run (golden KLs), and bad input."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST, LOOSE, build_tiny
from safetensors.torch import load_file

from sparsekd_deploy.cli import main
from sparsekd_deploy.config import build_config
from sparsekd_deploy.core import qat
from sparsekd_deploy.core.distill import distill
from sparsekd_deploy.core.patterns import NM
from sparsekd_deploy.core.pruner import Pruner, apply_masks
from sparsekd_deploy.errors import ConfigError


def _pruned_llama():
    model = build_tiny("llama").eval()
    pruner = Pruner(model, NM(2, 4))
    apply_masks(model, pruner.stage_masks({ly.name: ly.weight_oi().detach().abs() for ly in pruner.layers}, 1.0))
    return model


@pytest.mark.parametrize("mode", ["int8", "int4-weight"])
def test_fake_quantized_weights_keep_every_zero_and_pass_the_gradient_through(mode):
    torch.manual_seed(0)
    w = torch.randn(8, 64) * (torch.rand(8, 64) > 0.5)  # half zeros, as a pruned layer
    w.requires_grad_(True)
    q = qat.fake_quant_weight(w, mode)
    assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))
    assert 0 < (q - w).abs().max() < (0.3 if mode == "int4-weight" else 0.02)  # rounded, not replaced
    rows = q.detach().reshape(-1, 32) if mode == "int4-weight" else q.detach()
    assert max(len(torch.unique(r)) for r in rows) <= (16 if mode == "int4-weight" else 255)
    q.sum().backward()  # straight-through: every weight gets the upstream gradient (amax-scaled, so none clipped)
    assert torch.equal(w.grad, torch.ones_like(w))


def test_fake_quantized_forward_is_undone_on_exit():
    model = _pruned_llama()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        layers = qat.quantized_linears(model, "int8")
        ranges = qat.calibrate(model, layers, [ids], "cpu")
        with qat.fake_quantized(model, "int8", ranges):
            noisy = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert len(layers) == 15 and set(ranges) == set(layers)  # 2 layers x 7 Linears + lm_head
    assert 0 < (noisy - ref).abs().max() < 0.5
    assert torch.equal(again, ref)


# Seeded tiny Llama, fast_cfg + 8 QAT steps (int8: weights + calibrated activations), CPU fp32: the QAT stage's
# KL right after fake-quantizing and its kept KL, and the float KL of the last pruning stage before it.
GOLDEN = {"before": 0.028330, "kl_after_quant": 0.028404, "kl": 0.028096}


def test_qat_stage_golden_and_recorded(tiny_dirs, fast_cfg):
    cfg = build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "quantize": "int8",
                              "calibration_samples": 8, "qat_steps": 8})
    res = distill(cfg)
    assert res.status == "complete" and "then 8 quantization-aware (int8) step(s)" in res.reason
    last = res.trajectory[-1]
    assert last["stage"] == 3 and last["label"] == "qat int8" and last["accepted"] and last["steps"] == 8
    q = last["qat"]
    assert q["mode"] == "int8" and q["layers"] == 15 and q["kl_float_before"] == res.trajectory[-2]["kl"]
    assert [q["kl_float_before"], last["kl_after_prune"], last["kl"]] == pytest.approx(
        [GOLDEN["before"], GOLDEN["kl_after_quant"], GOLDEN["kl"]], rel=2e-3, abs=1e-6)
    assert last["kl"] <= last["kl_after_prune"]  # the stage keeps its best state (the quantized start included)
    # the saved student carries the QAT weights, float, with the 2:4 zeros of the pruning stages
    saved = load_file(str(res.out / "student" / "model.safetensors"))
    w = saved["model.layers.0.mlp.down_proj.weight"]
    assert (w.reshape(-1, 4) == 0).sum(1).ge(2).all()
    assert json.loads((res.out / "trajectory.json").read_text())["stages"][-1]["qat"]["mode"] == "int8"


@pytest.mark.parametrize("overrides, message", [
    ({"qat_steps": 5}, "qat_steps 5 trains the student against a quantization's rounding and quantize is none"),
    ({"qat_steps": -1, "quantize": "int8"}, "qat_steps must be ≥ 0"),
    ({"qat_steps": 5, "quantize": "fp8"}, "qat_steps is not available for quantize fp8"),
    ({"qat_steps": 5, "quantize": "int8", "pattern": "unstructured:auto"}, "qat_steps needs a fixed pattern"),
])
def test_config_refuses_bad_qat_settings(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config(None, overrides)
    assert any(message in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("args, message", [
    (["--qat-steps", "5"], "quantize is none: add --quantize"),
    (["--qat-steps", "-3", "--quantize", "int8"], "qat_steps must be ≥ 0"),
])
def test_build_refuses_bad_qat_steps_in_one_line_before_distilling(args, message, tiny_dirs, tmp_path):
    r = CliRunner().invoke(main, ["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"),
                                  *FAST, *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.run").exists()


def test_rebuild_reuses_a_run_across_quantize_modes_only_without_qat(tmp_path):
    """quantize is an export setting, unless a QAT stage trained against it: then another mode is another run."""
    from sparsekd_deploy.pipeline.build import _differing_flags

    state = tmp_path / "state.json"
    plain = build_config(None, {"quantize": "int8"})
    state.write_text(json.dumps({"config": plain.to_dict()}))
    assert _differing_flags(state, build_config(None, {"quantize": "int8-dynamic"})) == ""
    trained = build_config(None, {"quantize": "int8", "qat_steps": 30})
    state.write_text(json.dumps({"config": trained.to_dict()}))
    assert _differing_flags(state, build_config(None, {"quantize": "int8-dynamic", "qat_steps": 30})) == \
        "quantize=int8 (now int8-dynamic)"
    assert "qat_steps=30 (now 0)" in _differing_flags(state, build_config(None, {"quantize": "int8"}))


def test_build_with_qat_exports_the_qat_student_and_records_the_stage(tiny_dirs, tmp_path):
    r = CliRunner().invoke(main, ["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"),
                                  "--quantize", "int8", "--calibration-samples", "8", "--qat-steps", "4", "--json",
                                  *FAST, *LOOSE], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    b = tmp_path / "b"
    manifest = json.loads((b / "manifest.json").read_text())
    assert [t["label"] for t in manifest["trajectory"]][-1] == "qat int8"
    assert json.loads((b / "trajectory.json").read_text())["stages"][-1]["qat"]["layers"] == 15
    q = manifest["quantization"]
    assert len(next(v for k, v in q["kept_float"].items() if k.startswith("activation x activation"))) > 0
    run_student = load_file(str(tmp_path / "b.run" / "student" / "model.safetensors"))
    before = load_file(str(tmp_path / "b.run" / "checkpoints" / "stage-2" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(run_student[name], before[name])  # the QAT stage trained the exported student
    audit = json.loads((b / "audit.json").read_text())
    assert audit["model.int8.onnx"]["holding"] == audit["model.onnx"]["checked"] > 0
