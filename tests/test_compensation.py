"""Compensation of a channel prune: the output projection refitted on the kept channels (core/compensation.py)."""

import pytest
import torch
from conftest import build_tiny

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core.compensation import before_prune, compensate
from sparsekd_deploy.core.patterns import make_pattern
from sparsekd_deploy.core.pruner import Pruner, apply_masks
from sparsekd_deploy.errors import ConfigError


def _mlp_out(model, block, calib):
    seen = []
    h = block.output.module.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        for ids in calib:
            model(input_ids=ids)
    h.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_removed_channel_that_duplicates_a_kept_one_is_carried_by_it(family):
    model = build_tiny(family)
    pruner = Pruner(model, make_pattern("channels:0.0157"))  # one channel of 64 per block
    block = pruner.blocks[0]
    with torch.no_grad():  # channel 1 computes exactly what channel 0 does
        for layer in block.inputs:
            w = layer.weight_oi()
            w[1] = w[0]
            bias = getattr(layer.module, "bias", None)
            if bias is not None:
                bias[1] = bias[0]
    calib = [torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))]
    dense = _mlp_out(model, block, calib)
    scores = {ly.name: torch.ones(ly.shape_oi) for ly in pruner.layers}
    for b in pruner.blocks:
        scores[b.output.name][:, 0] = 0.0  # channel 0 goes in every block
    masks = pruner.stage_masks(scores, 1.0)
    before = before_prune(model, pruner, calib)
    apply_masks(model, masks)
    plain = (_mlp_out(model, block, calib) - dense).norm()
    compensate(pruner, before, masks)
    refit = (_mlp_out(model, block, calib) - dense).norm()
    assert refit < 0.1 * plain  # channel 1 took channel 0's column (up to the damping toward its own)
    out = block.output.weight_oi().detach()
    assert (out[:, 0] == 0).all()  # the removed column stays removed
    assert (pruner.channel_keeps(masks)[block.name] == out.ne(0).any(0)).all()


def test_compensation_needs_a_channel_pattern_and_no_fade():
    with pytest.raises(ConfigError, match="use it with channels:S") as e:
        build_config(None, {"pattern": "2:4", "compensation": "ls"})
    with pytest.raises(ConfigError, match="choose one"):
        build_config(None, {"pattern": "channels:0.5", "compensation": "ls", "demolition": "gradual"})
    with pytest.raises(ConfigError, match="compensation must be off or ls"):
        build_config(None, {"pattern": "channels:0.5", "compensation": "magic"})
    del e


# Seeded golden values (CPU, fp32, fast_cfg): tiny Llama, channels:0.5 at its defaults (fisher scores, ls refit), two
# stages of 4 steps, 16 calibration sequences: per stage the KL right after the prune and the stage's kept state.
GOLDEN = [(0.008822, 0.008795), (0.010963, 0.010687)]


def test_a_default_channel_run_refits_and_prunes_with_less_damage(tiny_dirs, fast_cfg, tmp_path):
    from sparsekd_deploy.core.distill import distill

    # 16 calibration sequences: fast_cfg's 4 (64 tokens) leave the refit of 64 channels underdetermined
    cfg = {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "pattern": "channels:0.5", "calib_batches": 4}
    built = build_config(None, cfg)
    assert (built.importance, built.compensation) == ("fisher", "ls")
    res = distill(built)
    got = [(s["kl_after_prune"], s["kl"]) for s in res.trajectory[1:]]
    assert [k for g in got for k in g] == pytest.approx([k for g in GOLDEN for k in g], rel=2e-3, abs=1e-6)
    plain = distill(build_config(None, {**cfg, "out": str(tmp_path / "plain"), "importance": "wanda",
                                        "compensation": "off"}))
    assert res.trajectory[1]["kl_after_prune"] < plain.trajectory[1]["kl_after_prune"]
    from sparsekd_deploy.models.loading import load_model

    assert load_model(res.out / "student", role="student").config.intermediate_size == 32


# Seeded golden values: held-out KL(dense ‖ refitted) of main's float64 compensation (before the float32 grams), tiny
# models, channels:0.5 by magnitude, 8 calibration batches of 8 × 16 tokens.
REFIT_GOLDEN = {"llama": 0.01346936, "gpt2": 0.00617576}


def _refit_kl(family):
    from sparsekd_deploy.core.importance import ScoringContext, score

    model = build_tiny(family)
    pruner = Pruner(model, make_pattern("channels:0.5"))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 256, (8, 16), generator=g) for _ in range(8)]
    held = torch.randint(3, 256, (4, 16), generator=g)
    with torch.no_grad():
        dense = model(input_ids=held).logits.log_softmax(-1)
    masks = pruner.stage_masks(score("magnitude", ScoringContext(model, pruner.layers, calib)), 1.0)
    before = before_prune(model, pruner, calib)
    assert all(g.dtype == torch.float32 for g in before.grams.values())
    apply_masks(model, masks)
    compensate(pruner, before, masks)
    with torch.no_grad():
        q = model(input_ids=held).logits.log_softmax(-1)
    return float((dense.exp() * (dense - q)).sum(-1).mean())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_float32_grams_refit_as_the_float64_ones_did(family):
    assert _refit_kl(family) == pytest.approx(REFIT_GOLDEN[family], rel=1e-3)


def test_grams_that_do_not_fit_are_refused_in_one_line(monkeypatch):
    from sparsekd_deploy.core import compensation, memory

    model = build_tiny("llama")
    pruner = Pruner(model, make_pattern("channels:0.5"))
    need = compensation.gram_bytes(pruner)
    # 2 blocks × 64 × (64 + 32) float32 held, plus one batch's gram and one block's float64 solve
    assert need == 2 * 64 * 96 * 4 + 64 * 96 * 20
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    calib = [torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ConfigError) as e:
        before_prune(model, pruner, calib)
    msg = str(e.value)
    assert "\n" not in msg and "pass --compensation off" in msg and "for 2 blocks" in msg
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    assert set(before_prune(model, pruner, calib).grams) == {b.name for b in pruner.blocks}
