"""The run's learning rate from a range test on the first stage (issue 9, part 5: defaults that transfer)."""

import math

import pytest
import torch
from torch import nn

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core.distill import distill
from sparsekd_deploy.core.lr_search import LRSearch, search_lr, trial_steps, wanted
from sparsekd_deploy.errors import ConfigError


def _bowl(best: float):
    """A held-out KL that is lowest at ``best`` and rises with |log2(lr / best)|."""
    return lambda lr: 0.1 + 0.01 * abs(math.log2(lr / best))


def _walk(kl_of, base=1e-3):
    model = nn.Linear(3, 3)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def trial(lr, steps):
        with torch.no_grad():
            model.weight.add_(lr * 1000)  # a trial changes the weights; the search must undo it
        return kl_of(lr)

    search = search_lr(model, base, 300, trial)
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    return search


def test_walks_up_to_a_larger_best_lr():
    s = _walk(_bowl(8e-3))
    assert s.chosen == pytest.approx(8e-3)
    assert [lr for lr, _ in s.trials] == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 16e-3])


def test_walks_down_to_a_smaller_best_lr():
    s = _walk(_bowl(2.5e-4))
    assert s.chosen == pytest.approx(2.5e-4)
    assert [lr for lr, _ in s.trials] == pytest.approx([1e-3, 2e-3, 5e-4, 2.5e-4, 1.25e-4])


def test_stays_put_at_the_best_lr_in_three_trials():
    s = _walk(_bowl(1e-3))
    assert s.chosen == pytest.approx(1e-3) and len(s.trials) == 3


def test_a_neighbour_within_the_margin_does_not_move_the_lr():
    # ×2 is 0.5 % better (short trials favour large steps): not enough to move
    s = _walk(lambda lr: {1e-3: 0.100, 2e-3: 0.0995}.get(lr, 0.2))
    assert s.chosen == pytest.approx(1e-3)


def test_a_diverging_trial_never_wins():
    s = _walk(lambda lr: {1e-3: 0.1, 2e-3: float("nan")}.get(lr, 0.2))
    assert s.chosen == pytest.approx(1e-3)
    assert math.isnan(s.trials[1][1])


def test_the_walk_is_bounded():
    s = _walk(lambda lr: 1.0 / lr)  # always better higher: stops at 16 × base
    assert s.chosen == pytest.approx(16e-3)


def test_auto_searches_only_budgets_worth_it():
    assert not wanted("auto", 30) and wanted("auto", 90) and wanted("on", 8) and not wanted("off", 300)
    assert not wanted("auto", 600, sparsity_search=True) and wanted("on", 600, sparsity_search=True)
    assert trial_steps(90) == 10 and trial_steps(300) == 20 and trial_steps(8) == 10
    assert LRSearch(1e-3, 10, [[1e-3, 0.1]], 1e-3).to_dict()["chosen"] == 1e-3


# Seeded golden values (CPU, fp32): tiny Llama, one 2:4 stage of 20 steps with the range test on.
GOLDEN_CHOSEN = 1e-3
GOLDEN_TRIALS = [(5e-4, 0.026896), (1e-3, 0.024854), (2e-3, 0.025075)]  # ×2 wins, ×4 does not: stop at 1e-3
GOLDEN_KL = 0.022406


def test_range_test_chooses_records_and_trains_at_the_chosen_lr(tiny_dirs, fast_cfg):
    cfg = build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "stages": 1, "steps_per_stage": 20,
                              "lr_search": "on"})
    res = distill(cfg)
    stage = res.trajectory[1]
    search = stage["lr_search"]
    assert search["base"] == 5e-4 and search["steps_per_trial"] == 10
    got = [x for trial in search["trials"] for x in trial]
    assert got == pytest.approx([x for trial in GOLDEN_TRIALS for x in trial], rel=2e-3, abs=1e-6)
    assert search["chosen"] == pytest.approx(GOLDEN_CHOSEN)
    assert stage["kl"] == pytest.approx(GOLDEN_KL, rel=2e-3)
    assert stage["steps"] == 20  # the trials are extra compute, not part of the stage's budget
    # The trials leave no trace: the same run told the chosen lr, without searching, trains to the same student.
    told = distill(build_config(None, {**cfg.to_dict(), "lr_search": "off", "lr": GOLDEN_CHOSEN,
                                       "out": cfg.out + "-told"}))
    assert "lr_search" not in told.trajectory[1]
    assert told.trajectory[1]["lr"] == stage["lr"]
    assert told.trajectory[1]["kl_after_prune"] == pytest.approx(stage["kl_after_prune"], rel=1e-6)
    assert told.trajectory[1]["kl"] == pytest.approx(stage["kl"], rel=1e-6)


def test_a_staged_run_searches_once_and_keeps_its_first_prune(tiny_dirs, fast_cfg):
    # The trials prune the student to the whole target; the first stage must still start from its own share.
    base = {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "pattern": "unstructured:0.6", "steps_per_stage": 10}
    on = distill(build_config(None, {**base, "lr_search": "on"}))
    off = distill(build_config(None, {**base, "lr_search": "off", "out": base["out"] + "-off"}))
    assert on.trajectory[1]["kl_after_prune"] == pytest.approx(off.trajectory[1]["kl_after_prune"], rel=1e-6)
    assert "lr_search" in on.trajectory[1] and "lr_search" not in on.trajectory[2]


def test_a_diverging_trial_loses_and_the_run_goes_on(tiny_dirs, fast_cfg, monkeypatch):
    from sparsekd_deploy.core.stage_training import StageTraining
    from sparsekd_deploy.errors import NonFiniteLossError

    real = StageTraining.train_steps

    def diverging_above_1e3(self, gen, start, stop, total, peak_lr, stage_label):
        if " lr " in stage_label and peak_lr > 1.5e-3:
            raise NonFiniteLossError("non-finite loss (nan)")
        return real(self, gen, start, stop, total, peak_lr, stage_label)

    monkeypatch.setattr(StageTraining, "train_steps", diverging_above_1e3)
    cfg = build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "stages": 1, "steps_per_stage": 20,
                              "lr_search": "on"})
    res = distill(cfg)
    assert res.reached_target
    trials = res.trajectory[1]["lr_search"]["trials"]
    assert [lr for lr, _ in trials] == pytest.approx([5e-4, 1e-3, 2e-3]) and trials[2][1] == math.inf
    assert res.trajectory[1]["lr_search"]["chosen"] == pytest.approx(1e-3)


def test_a_resumed_run_trains_on_at_the_lr_it_chose():
    from types import SimpleNamespace

    from sparsekd_deploy.core.stage_training import StageTraining

    def base_lr(trajectory):
        return StageTraining._base_lr(SimpleNamespace(base_lr=None, trajectory=trajectory, cfg=SimpleNamespace(lr=5e-4)))

    dense = {"stage": 0}
    assert base_lr([dense]) is None  # the first stage decides
    assert base_lr([dense, {"stage": 1, "lr_search": {"chosen": 2e-3}}, {"stage": 2}]) == 2e-3
    assert base_lr([dense, {"stage": 1}]) == 5e-4  # a run that did not search (or began before searching existed)


def test_bad_lr_search_is_one_line():
    with pytest.raises(ConfigError, match="lr_search must be auto, on or off"):
        build_config(None, {"lr_search": "sometimes"})
