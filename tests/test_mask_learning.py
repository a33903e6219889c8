"""Masks chosen through the KD loss (SR-STE) in the first part of a stage (issue 9, part 6)."""

import pytest
import torch
from conftest import OneLinear

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core.distill import distill
from sparsekd_deploy.core.mask_learning import MaskLearner, learning_start
from sparsekd_deploy.core.patterns import NM, make_pattern
from sparsekd_deploy.core.pruner import Pruner, apply_masks
from sparsekd_deploy.errors import ConfigError


def _learning_2_4(model, **options):
    """``model.fc`` pruned 2:4 by magnitude and a learner started from its dense weights: (learner, dense, masks)."""
    pruner = Pruner(model, make_pattern("2:4"))
    dense = learning_start(model, pruner)
    masks = pruner.stage_masks({"fc": model.fc.weight.detach().abs()}, 1.0)
    apply_masks(model, masks)
    learner = MaskLearner(model, pruner, masks, 1.0, input_norms=None, **options)
    learner.start(dense)
    return learner, dense, masks


def test_a_pruned_weight_that_grows_takes_its_groups_place():
    model = OneLinear()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]))
    learner, dense, _ = _learning_2_4(model)
    learner.before_step()
    assert torch.equal(model.fc.weight, dense["fc.weight"])  # the step sees the dense latents
    with torch.no_grad():
        model.fc.weight[0, 3] += 10.0  # as if the KD gradient pushed a pruned weight up
    learner.after_step(lr=1e-3)
    w = model.fc.weight.detach()
    assert w[0].tolist() == [4.0, 0.0, 0.0, 11.0]  # it won a place; the weakest survivor gave it up
    assert w[1].tolist() == [0.0, 0.0, 3.0, 4.0]
    assert learner.flips == 2
    assert learner.finish()["fc.weight"].tolist() == [[True, False, False, True], [False, False, True, True]]


def test_weights_pruned_by_an_earlier_stage_never_come_back():
    model = OneLinear()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]))
    pruner = Pruner(model, make_pattern("unstructured:0.5"))
    earlier = {"fc.weight": torch.tensor([[True, True, True, False], [True, True, True, True]])}
    masks = pruner.stage_masks({"fc": model.fc.weight.detach().abs()}, 1.0)
    learner = MaskLearner(model, pruner, masks, 1.0, input_norms=None, frozen=earlier)
    learner.start({"fc.weight": torch.tensor([[4.0, 3.0, 2.0, 100.0], [1.0, 2.0, 3.0, 4.0]])})
    learner.before_step()
    learner.after_step(lr=1e-3)
    assert not learner.masks["fc.weight"][0, 3]  # 100 is the largest latent, but stage 1 removed it


def test_decay_shrinks_only_pruned_latents():
    model = OneLinear()
    learner, dense, masks = _learning_2_4(model, decay=100.0)
    learner.before_step()
    learner.after_step(lr=1e-3)  # factor 1 - 0.1 on pruned latents
    keep = masks["fc.weight"]
    lat = learner.latent["fc.weight"]
    assert torch.allclose(lat[keep], dense["fc.weight"][keep])
    assert torch.allclose(lat[~keep], 0.9 * dense["fc.weight"][~keep])


# Seeded golden values (CPU, fp32, fast_cfg): tiny Llama, 2:4, two stages of 4 steps, half of each learning masks.
GOLDEN = [(0.018417, 0.015943), (0.033033, 0.028150)]


def test_sr_ste_stage_keeps_the_pattern_and_records_what_it_learned(tiny_dirs, fast_cfg):
    res = distill(build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "mask_learning": "sr-ste"}))
    assert res.reached_target
    got = [(s["kl_after_prune"], s["kl"]) for s in res.trajectory[1:]]
    assert [k for p in got for k in p] == pytest.approx([k for p in GOLDEN for k in p], rel=2e-3, abs=1e-6)
    for stage in res.trajectory[1:]:
        ml = stage["mask_learning"]
        assert ml["method"] == "sr-ste" and ml["steps"] == 2 and stage["steps"] == 4
        assert 0.0 < ml["share_new"] < 0.1 and ml["flips"] > 0  # some masks moved, most one-shot choices held
    assert [s["mask_learning"]["kl_after"] for s in res.trajectory[1:]] == pytest.approx([0.017947, 0.030733], rel=2e-3)
    from sparsekd_deploy.models.loading import load_model

    student = load_model(res.out / "student", role="student")
    pattern = NM(2, 4)
    for layer in Pruner(student, pattern).layers:
        assert pattern.holds(layer.weight_oi().detach())


def test_bad_mask_learning_options_are_one_line():
    with pytest.raises(ConfigError, match="mask_learning must be off or sr-ste") as e:
        build_config(None, {"mask_learning": "magic", "mask_learning_share": 1.5})
    assert "mask_learning_share must be in (0, 1)" in str(e.value)


def test_mask_learning_share_without_sr_ste_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="does nothing without it: add --mask-learning sr-ste"):
        build_config(None, {"mask_learning_share": 0.3})
    assert build_config(None, {"mask_learning": "sr-ste", "importance": "wanda"}).mask_learning_share == 0.5


def test_a_diverging_mask_learning_phase_stops_the_run_at_its_last_stage(tiny_dirs, fast_cfg, monkeypatch):
    from sparsekd_deploy.errors import NonFiniteLossError

    calls = []

    def diverge_in_stage_2(self, lr):
        calls.append(lr)
        if len(calls) > 2:  # stage 1 learns for 2 steps; stage 2's first step diverges
            raise NonFiniteLossError("non-finite loss (nan) at stage 2")
        return real(self, lr)

    real = MaskLearner.after_step
    monkeypatch.setattr(MaskLearner, "after_step", diverge_in_stage_2)
    res = distill(build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "mask_learning": "sr-ste"}))
    assert not res.reached_target and res.summary["final_stage"] == 1
    assert "non-finite" in res.reason


def test_a_learning_step_holds_no_second_copy_of_the_weights_while_it_ranks():
    """The latents are copied in and out of the parameters (FSDP needs that); the copy must not cost what the old
    ``.data`` swap did not: from ``before_step`` to the ranking the parameter is the latents' only copy. Bytes of live
    CPU tensors (``TensorBytes``) over a step with plain SGD (no optimizer state) on one 256 x 256 Linear of W bytes,
    peak minus what was live when the step began: 6.5 W (the ranking's scores and 2:4 choice are most of it); with
    the latents held beside the parameter through the step (ee08c28) it was 7.5 W — one more copy of the weights."""
    from sparsekd_deploy.core.memory import TensorBytes

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(256, 256, bias=False))
    learner, _, _ = _learning_2_4(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model(torch.randn(4, 256)).square().sum().backward()
    w = model.fc.weight.numel() * 4
    tb = TensorBytes()
    with tb:
        entry = tb.current  # the parameter, its gradient, the latents, the masks (and whatever else the process holds)
        learner.before_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tb.peak = tb.current  # from here on: the parameter, the latents, the ranking
        learner.after_step(lr=1e-3)
    assert (tb.peak - entry) / w == pytest.approx(6.5, abs=0.25)
    assert torch.equal(model.fc.weight, learner.latent["fc.weight"] * learner.masks["fc.weight"])  # still SR-STE
