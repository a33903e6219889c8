"""``--pattern unstructured:auto`` / ``channels:auto``: prune until the next step would deform the student.

Stages keep adding sparsity while the stage after recovery stays within the KL budget; a rejected stage is undone
(the last accepted state is restored) and the step is halved, as a line search does, until it falls below
``MIN_STEP``. The run returns the sparsest accepted student and says how far it got and why it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .patterns import Channels, Pattern, Unstructured
from .schedule import Stage

FIRST_STEP = 0.2  # the first stages are cheap (light prunes cost little KL), so start with big strides
MIN_STEP = 0.025  # below this, one more stage would buy less than 2.5 % of the weights: stop
MAX_SPARSITY = 0.95
MIN_STAGES = 10  # stage attempts allowed at least (``--stages`` raises it)


@dataclass
class AutoSearch:
    kind: str  # "unstructured" | "channels"
    max_stages: int
    accepted_sparsity: float = 0.0
    step: float = FIRST_STEP
    tried: int = 0
    last_rejected: tuple[float, float] | None = None  # (sparsity, KL) of the last stage over the budget

    @classmethod
    def for_spec(cls, spec: str, stages: int) -> AutoSearch:
        return cls(spec.split(":")[0].strip(), max(stages, MIN_STAGES))

    def pattern_at(self, sparsity: float) -> Pattern:
        return Channels(sparsity) if self.kind == "channels" else Unstructured(sparsity)

    def next_stage(self, steps: int) -> tuple[Stage, Pattern] | None:
        """The next stage to try, or None when the search is over."""
        if self.tried >= self.max_stages or self.step < MIN_STEP:
            return None
        target = round(min(self.accepted_sparsity + self.step, MAX_SPARSITY), 4)
        if target <= self.accepted_sparsity:
            return None
        self.tried += 1
        return Stage(self.tried, 1.0, f"auto {target:.1%}", steps), self.pattern_at(target)

    def accept(self, sparsity: float) -> None:
        self.accepted_sparsity = sparsity

    def reject(self, sparsity: float, kl: float) -> None:
        self.last_rejected = (sparsity, kl)
        self.step /= 2

    def replay(self, trajectory: list[dict]) -> None:
        """Continue a resumed search from its recorded stages (the dense entry first): every attempt counts, an
        accepted one moves the sparsity and a rejected one halves the step, as it did live. Without the rejections a
        resumed search went back to the first step and tried sparsities the interrupted run had already ruled out."""
        for r in trajectory[1:]:
            self.tried = r["stage"]
            if r["accepted"]:
                self.accept(r["target_sparsity"])
            else:  # an untrained stage records no kl; its verdict was on the pruned student's (as in StageOutcome)
                self.reject(r["target_sparsity"], r["kl"] if r["kl"] is not None else r["kl_after_prune"])

    def reason(self, budget: float) -> str:
        got = f"reached {self.kind} {self.accepted_sparsity:.1%} within KL budget {budget}"
        if self.accepted_sparsity >= MAX_SPARSITY:
            return f"{got} (the search's ceiling)"
        why = []
        if self.last_rejected and self.last_rejected[0] > self.accepted_sparsity:
            s, kl = self.last_rejected  # (a rejected step from a less sparse state may later pass from a sparser one)
            why.append(f"{s:.1%} broke it (KL {kl:.4f})")
        why.append(f"the step fell below {MIN_STEP:.1%}" if self.step < MIN_STEP
                   else f"{self.tried} stage attempts used (raise --stages for more)")
        return f"{got}; " + ", ".join(why)
