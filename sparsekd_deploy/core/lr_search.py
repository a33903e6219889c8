"""The learning rate chosen per run from the model (``--lr-search``): a short range test on the first stage's student.

The default lr (5e-4) was tuned on the demo teacher; on another model the best step size can be several times larger
or smaller (a user's small Llama wanted 3e-3 at batch 32). Before the first stage's recovery, the pruned student
trains a few steps at a candidate lr from its post-prune state, on the same batches each time, and the held-out KL
after the trial ranks the candidates. The walk starts at the configured lr, tries ×2 (then ÷2 if ×2 did not win),
and keeps moving by factors of 2 in the direction that wins, until a step does not win or ``MAX_FACTOR`` is reached. The student goes
back to its post-prune state and the run continues with the chosen lr as its base (later stages scale it by their
damage as before, recovery.py). The trials' steps are extra compute, not part of the stage's step budget, and are
recorded beside it.

A neighbour must beat the current candidate by more than ``MARGIN`` to win: short trials favour large steps (what
lowers the loss fastest in a few steps can overshoot over a longer schedule, the short-horizon bias of Wu et al.
2018), and ties should not move the lr. Measured before this was written (README, "Learning rate per run"): 10-step
trials at 2:4 rank 5e-4 first on the wide teacher and within 0.6 % of 1e-3 on the demo; the 90-step sweeps put
the best lr at 5e-4 on both. 5-step trials picked 1e-3 on the demo (1.8 % ahead), hence ``TRIAL_MIN`` = 10.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .recovery import restore, snapshot

MARGIN = 0.01  # a neighbour wins only with a held-out KL more than 1 % below the current candidate's
MAX_FACTOR = 16.0  # the walk stays within [lr / 16, lr × 16]
# Steps per trial: 10 % of the run's step budget, within bounds (a walk usually costs 3 trials).
TRIAL_SHARE = 0.1
TRIAL_MIN, TRIAL_MAX = 10, 20
# "auto" searches when the run's budget is at least this many steps: below it the trials would cost half the run.
AUTO_MIN_BUDGET = 60


def trial_steps(budget: int) -> int:
    return max(TRIAL_MIN, min(TRIAL_MAX, round(budget * TRIAL_SHARE)))


def wanted(mode: str, budget: int, sparsity_search: bool = False) -> bool:
    """Whether a run with this ``--lr-search`` mode and total step budget searches its lr. ``auto`` does not search
    for a ``:auto`` pattern (``sparsity_search``): its whole target is unknown before the run, and trials at its first
    attempt's light prune favour a small lr (2.5e-4 instead of 5e-4 on the wide teacher at a 20 % first stage)."""
    return mode == "on" or (mode == "auto" and budget >= AUTO_MIN_BUDGET and not sparsity_search)


@dataclass
class LRSearch:
    base: float  # the configured lr the walk starts from
    steps: int  # steps per trial
    trials: list[list[float]] = field(default_factory=list)  # [lr, held-out KL after the trial], in the order run
    chosen: float | None = None

    def to_dict(self) -> dict:
        return {"base": self.base, "steps_per_trial": self.steps, "trials": self.trials, "chosen": self.chosen}


def _wins(new: float, old: float) -> bool:
    return math.isfinite(new) and new < old * (1 - MARGIN)


def search_lr(model: nn.Module, base: float, budget: int, trial: Callable[[float, int], float]) -> LRSearch:
    """Walk the lr from ``base``; ``trial(lr, steps)`` trains ``steps`` from the current state and returns the held-out
    KL. The model is put back into the state it came in with after every trial."""
    search = LRSearch(base, trial_steps(budget))
    start = snapshot(model)

    def run(lr: float) -> float:
        try:
            kl = float(trial(lr, search.steps))
        finally:
            restore(model, start)
        search.trials.append([lr, kl])
        return kl if math.isfinite(kl) else math.inf

    best_lr, best = base, run(base)
    up = run(base * 2)
    direction = 2.0 if _wins(up, best) else 0.5
    if direction == 2.0:
        best_lr, best = base * 2, up
    while base / MAX_FACTOR <= best_lr * direction <= base * MAX_FACTOR:
        kl = run(best_lr * direction)
        if not _wins(kl, best):
            break
        best_lr, best = best_lr * direction, kl
    search.chosen = best_lr
    return search
