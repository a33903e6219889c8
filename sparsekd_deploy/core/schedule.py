"""Stage plans: how the target pattern is reached in n stages ("staged demolition")."""

from __future__ import annotations

from dataclasses import dataclass

from .patterns import NM, Pattern


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    fraction: float  # share of the final pattern applied after this stage
    label: str


def plan(pattern: Pattern, stages: int) -> list[Stage]:
    """Equal steps from dense to the target. For n:m the zeros per group grow evenly, so 2:4 in two stages
    goes 1-of-4 zero → 2-of-4 zero; in three stages the middle steps mix groups with k and k+1 zeros."""
    out = []
    for k in range(1, stages + 1):
        f = k / stages
        if isinstance(pattern, NM):
            zeros = f * (pattern.m - pattern.n)
            label = f"{pattern.m - zeros:g}:{pattern.m}" if zeros == int(zeros) else f"{pattern.spec}@{f:.0%}"
        else:
            label = f"{pattern.spec}@{f:.0%}"
        out.append(Stage(k, f, label))
    return out
