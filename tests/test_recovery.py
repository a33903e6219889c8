"""Recovery after a prune never makes a stage worse than the prune left it (issue 9, part 0)."""

import pytest
import torch
from torch import nn

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core.distill import distill
from sparsekd_deploy.core.recovery import FULL_LR_KL, MIN_LR_SCALE, Recovery, checkpoint_steps, recovery_lr


def test_lr_follows_the_damage():
    assert recovery_lr(5e-4, FULL_LR_KL) == pytest.approx(5e-4)
    assert recovery_lr(5e-4, 10 * FULL_LR_KL) == pytest.approx(5e-4)  # never above the configured lr
    assert recovery_lr(5e-4, FULL_LR_KL / 4) == pytest.approx(1.25e-4)  # in proportion to the KL
    assert recovery_lr(5e-4, 0.0002) == pytest.approx(1e-5)  # the 10 % unstructured stage on the demo
    assert recovery_lr(5e-4, 0.0) == pytest.approx(5e-4 * MIN_LR_SCALE)
    assert recovery_lr(5e-4, float("nan")) == pytest.approx(5e-4)


def test_checkpoints_end_at_the_last_step():
    assert checkpoint_steps(100) == [25, 50, 75, 100]
    assert checkpoint_steps(6) == [2, 3, 4, 6]
    assert checkpoint_steps(2) == [1, 2]
    assert checkpoint_steps(1) == [1]


def _toy():
    torch.manual_seed(0)
    return nn.Linear(4, 4)


def test_recovery_goes_back_to_the_post_prune_state_when_training_hurts():
    model = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kls = iter([0.5, 0.7, 0.9, 1.1])  # every checkpoint worse than right after the prune (0.3)

    def train(start, stop):
        with torch.no_grad():
            model.weight.add_(1.0)

    rec = Recovery.start(model, {"kl": 0.3, "top1": 0.9})
    went_back = rec.attempt(model, 8, train, lambda: {"kl": next(kls), "top1": 0.5})
    assert went_back and rec.step == 0 and rec.steps == 8 and rec.metrics == {"kl": 0.3, "top1": 0.9}
    assert rec.checkpoints == [[0, 0.3], [2, 0.5], [4, 0.7], [6, 0.9], [8, 1.1]]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recovery_keeps_the_best_checkpoint_and_never_a_non_finite_one():
    model = _toy()
    kls = iter([0.2, 0.1, float("nan"), 0.15])
    seen = {}

    def train(start, stop):
        with torch.no_grad():
            model.weight.add_(1.0)
        seen[stop] = model.weight.detach().clone()

    rec = Recovery.start(model, {"kl": 0.3, "top1": 0.9})
    assert rec.attempt(model, 4, train, lambda: {"kl": next(kls), "top1": 0.5})
    assert rec.step == 2 and rec.metrics["kl"] == 0.1 and torch.equal(model.weight, seen[2])
    # a second attempt continues from the kept state; its last checkpoint is the best: no going back
    kls = iter([0.09, 0.08, 0.07, 0.05])
    assert not rec.attempt(model, 4, train, lambda: {"kl": next(kls), "top1": 0.6})
    assert rec.step == rec.steps == 8 and rec.metrics["kl"] == 0.05



def test_heldout_measurement_of_a_diverged_student_is_a_nan_kl_not_a_crash():
    """A recovery step can leave the student's weights infinite (a too-large lr): its held-out measurement must give
    a non-finite KL, which never wins (above), so the run stops at its next step's non-finite loss, at its last
    accepted stage. Its NaN confidences once met torch.bincount as a negative ECE bin and ended the run with a
    traceback (1 process and 2 ranks alike). The same student before the damage measures finite."""
    from conftest import build_tiny

    from sparsekd_deploy.core.evaluate import heldout_metrics

    teacher, student = build_tiny("llama"), build_tiny("llama", seed=1)
    heldout = torch.randint(256, (4, 8), generator=torch.Generator().manual_seed(0))
    fine = heldout_metrics(teacher, student, heldout, 2, "cpu")
    assert 0.0 < fine["kl"] < float("inf") and 0.0 <= fine["ece"] <= 1.0
    with torch.no_grad():
        for w in student.parameters():  # a diverged step's weights
            w.fill_(float("inf"))
    diverged = heldout_metrics(teacher, student, heldout, 2, "cpu")
    assert torch.isnan(torch.tensor(diverged["kl"])) and not diverged["kl"] < fine["kl"]

# The demo teacher, one light stage (10 % unstructured), data-free, small enough for a unit test (seconds a seed when the machine is idle).
LIGHT = dict(pattern="unstructured:0.1", stages=1, steps_per_stage=8, seq_len=32, num_samples=16, heldout_samples=8,
             batch_size=8, calib_batches=1, consistency_prompts=2, consistency_samples=2, consistency_tokens=4,
             consistency_m=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_light_stage_on_the_demo_never_ends_above_its_post_prune_kl(seed, tmp_path):
    res = distill(build_config(None, {**LIGHT, "seed": seed, "out": str(tmp_path / "run")}))
    stage = res.trajectory[1]
    assert res.reached_target and stage["accepted"]
    assert stage["kl"] <= stage["kl_after_prune"]
    assert stage["lr"] < 5e-4 * 0.2  # a light prune trains at a fraction of the configured lr
