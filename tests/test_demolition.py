"""Gradual demolition: a stage's removal fades out over its first steps while the rest trains (core/demolition.py)."""

import pytest
import torch
from conftest import OneLinear

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core.demolition import Fade
from sparsekd_deploy.core.distill import distill
from sparsekd_deploy.core.mask_learning import learning_start
from sparsekd_deploy.core.patterns import make_pattern
from sparsekd_deploy.core.pruner import Pruner, apply_masks
from sparsekd_deploy.errors import ConfigError


def test_removed_weights_fade_linearly_and_end_exactly_zero():
    model = OneLinear()
    w0 = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    with torch.no_grad():
        model.fc.weight.copy_(w0)
    pruner = Pruner(model, make_pattern("unstructured:0.5"))
    dense = learning_start(model, pruner)
    masks = pruner.stage_masks({"fc": w0.abs()}, 1.0)
    apply_masks(model, masks)
    fade = Fade(model, pruner, dense, {}, masks, steps=4)
    fade.hold()
    assert torch.equal(model.fc.weight.detach(), w0)  # factor 1: the removed weights are back
    keep = masks["fc.weight"]
    for k in range(1, 5):
        with torch.no_grad():
            model.fc.weight.add_(0.5)  # an optimizer step moves every weight...
        apply_masks(model, masks)
        fade.after_step()
        w = model.fc.weight.detach()
        assert torch.allclose(w[~keep], w0[~keep] * (1 - k / 4))  # ...but the removed ones follow the factor
        assert torch.allclose(w[keep], w0[keep] + 0.5 * k)  # the kept ones train
    assert fade.finished and (model.fc.weight.detach()[~keep] == 0).all()


def test_only_this_stages_removal_fades():
    model = OneLinear()
    w0 = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    pruner = Pruner(model, make_pattern("unstructured:0.5"))
    earlier = {"fc.weight": torch.tensor([[True, True, True, False], [False, True, True, True]])}
    masks = pruner.stage_masks({"fc": torch.where(earlier["fc.weight"], w0, -torch.inf)}, 1.0)
    with torch.no_grad():
        model.fc.weight.copy_(w0 * masks["fc.weight"])
    Fade(model, pruner, {"fc.weight": w0}, earlier, masks, steps=2).hold()
    w = model.fc.weight.detach()
    assert w[0, 3] == 0 and w[1, 0] == 0  # pruned by an earlier stage: they stay zero
    assert w[0, 2] == 2.0 and w[1, 1] == 2.0  # removed by this stage: back at factor 1


def test_a_channel_fades_through_its_output_column_only(tiny_dirs):
    from sparsekd_deploy.models.loading import load_model

    model = load_model(tiny_dirs["llama"])
    pruner = Pruner(model, make_pattern("channels:0.5"))
    dense = learning_start(model, pruner)
    scores = {ly.name: ly.weight_oi().detach().abs() for ly in pruner.layers}
    masks = pruner.stage_masks(scores, 1.0)
    apply_masks(model, masks)
    fade = Fade(model, pruner, dense, {}, masks, steps=2)
    block = pruner.blocks[0]
    fade.after_step()  # factor 0.5
    out = block.output
    gone = ~masks[out.param_name]
    assert torch.allclose(out.module.weight.detach()[gone], 0.5 * dense[out.param_name][gone])
    for layer in block.inputs:  # a channel's contribution is linear in its down column; its gate/up rows stay whole
        gone_in = ~masks[layer.param_name]
        assert torch.equal(layer.module.weight.detach()[gone_in], dense[layer.param_name][gone_in])
    apply_masks(model, masks)
    fade.after_step()  # factor 0: the whole channel is zero
    for name, keep in masks.items():
        assert (dict(model.named_parameters())[name].detach()[~keep] == 0).all()


# Seeded golden values (CPU, fp32, fast_cfg): tiny Llama, channels:0.5, two stages of 4 steps, the first 2 fading.
# Per stage: KL right after the (hard) prune, after the fade, and the stage's kept state.
GOLDEN = [(0.010022, 0.009319, 0.009157), (0.012007, 0.012276, 0.011661)]


def test_gradual_stages_fade_record_and_end_in_the_pattern(tiny_dirs, fast_cfg):
    cfg = build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "pattern": "channels:0.5",
                              "demolition": "gradual", "importance": "wanda"})
    assert cfg.compensation == "off"  # asked for a fade, the default refit steps aside
    res = distill(cfg)
    assert res.reached_target
    got = [(s["kl_after_prune"], s["demolition"]["kl_after"], s["kl"]) for s in res.trajectory[1:]]
    assert [k for g in got for k in g] == pytest.approx([k for g in GOLDEN for k in g], rel=2e-3, abs=1e-6)
    for stage in res.trajectory[1:]:
        assert stage["demolition"] == {"method": "gradual", "steps": 2, "kl_after": stage["demolition"]["kl_after"]}
        assert stage["steps"] == 4
        assert stage["kl"] <= stage["kl_after_prune"]  # the hard-pruned state stays a candidate
    # the masks held through the recovery: the student reloads shrunk to half its channels
    assert res.summary["sparsity"] == pytest.approx(0.5, abs=0.01)
    from sparsekd_deploy.models.loading import load_model

    student = load_model(res.out / "student", role="student")
    assert student.config.intermediate_size == 32


def test_bad_demolition_options_are_one_line():
    with pytest.raises(ConfigError, match="demolition must be off or gradual") as e:
        build_config(None, {"demolition": "magic", "demolition_share": 1.5})
    assert "demolition_share must be in (0, 1)" in str(e.value)
    with pytest.raises(ConfigError, match="choose one"):
        build_config(None, {"demolition": "gradual", "mask_learning": "sr-ste"})


def test_demolition_share_without_gradual_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="does nothing without it: add --demolition gradual"):
        build_config(None, {"demolition_share": 0.3})
    assert build_config(None, {"demolition": "gradual"}).demolition_share == 0.5
    assert build_config(None, {"demolition": "gradual", "demolition_share": 0.3}).demolition_share == 0.3
    assert build_config(None, {}).demolition_share is None  # unused by a run without gradual demolition


def test_masks_bind_from_the_end_of_the_fade_on(tiny_dirs, fast_cfg, monkeypatch):
    from conftest import masks_bind_after_each_training_segment

    seen = masks_bind_after_each_training_segment(monkeypatch)
    distill(build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "pattern": "channels:0.5",
                                "demolition": "gradual", "lr": 0.05}))
    # per stage: the fade (its last step brings the factor to 0), then the recovery's 2 segments
    assert seen == [True] * 6
