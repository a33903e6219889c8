"""Stage plans: how the target pattern is reached in n stages ("staged demolition")."""

from __future__ import annotations

from dataclasses import dataclass

from .patterns import NM, Pattern


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    fraction: float  # share of the final pattern applied after this stage
    label: str
    steps: int = 0  # distillation steps of the first attempt


def opening_steps(stage_steps: int, share: float) -> int:
    """Steps of a stage's opening phase (mask learning, a gradual demolition's fade): ``share`` of them, leaving at
    least one for the recovery (0 = the stage is too short for the phase)."""
    k = round(stage_steps * share)
    return min(k, stage_steps - 1) if k >= 1 else 0


def step_budget(stages: int, steps_per_stage: int, schedule: str) -> list[int]:
    """Split the total budget (stages × steps_per_stage). ``backloaded`` gives stage k a share ∝ k: early
    stages remove little load and need little repair, the last one removes the most and needs the most."""
    total = stages * steps_per_stage
    if schedule == "equal" or stages == 1:
        return [steps_per_stage] * stages
    weights = list(range(1, stages + 1))
    steps = [max(1, total * w // sum(weights)) for w in weights]
    steps[-1] += total - sum(steps)
    return steps


def fractions(stages: int, sparsity_schedule: str = "linear") -> list[float]:
    """Share of the final pattern after each stage. ``cubic`` (Zhu & Gupta's gradual-pruning curve,
    1 - (1 - k/n)^3) removes most weights early, while the model is still close to the teacher, and little at
    the end, so the last stage has less damage to repair."""
    if sparsity_schedule == "cubic":
        return [1 - (1 - k / stages) ** 3 for k in range(1, stages + 1)]
    return [k / stages for k in range(1, stages + 1)]


def plan(pattern: Pattern, stages: int, steps_per_stage: int = 0, schedule: str = "equal",
         sparsity_schedule: str = "linear") -> list[Stage]:
    """The stages from dense to the target: each one's share of the pattern (``sparsity_schedule``) and its
    first-attempt steps (``schedule``). These defaults (equal, linear) are the plain split; a run passes its config's
    (backloaded, cubic by default). For n:m with the linear split the zeros per group grow evenly, so 2:4 in two
    stages goes 1-of-4 zero → 2-of-4 zero; intermediate shares mix groups with k and k+1 zeros."""
    out = []
    budget = step_budget(stages, steps_per_stage, schedule) if steps_per_stage else [0] * stages
    for k, f in enumerate(fractions(stages, sparsity_schedule), start=1):
        if isinstance(pattern, NM):
            zeros = f * (pattern.m - pattern.n)
            label = f"{pattern.m - zeros:g}:{pattern.m}" if zeros == int(zeros) else f"{pattern.spec}@{f:.0%}"
        else:
            label = f"{pattern.spec}@{f:.0%}"
        out.append(Stage(k, f, label, budget[k - 1]))
    return out
