"""Pass/fail gates over validation metrics. KL gates always sit beside consistency gates: a collapsed model
is "consistent" too, so steadiness only counts while the distribution still matches the teacher."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ConfigError


@dataclass
class Gates:
    max_kl: float = 0.25
    min_top1: float = 0.7
    min_greedy_match: float = 0.1
    max_ppl_ratio: float = 1.5
    min_consistency_ratio: float = 0.8
    require_determinism: bool = True

    def check_ranges(self) -> None:
        problems = []
        if not (self.max_kl > 0 and math.isfinite(self.max_kl)):
            problems.append(f"--max-kl must be a finite number > 0, got {self.max_kl}")
        for name in ("min_top1", "min_greedy_match"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"--{name.replace('_', '-')} must lie in [0, 1], got {v}")
        if not (self.max_ppl_ratio >= 1.0 and math.isfinite(self.max_ppl_ratio)):
            problems.append(f"--max-ppl-ratio must be a finite number ≥ 1, got {self.max_ppl_ratio}")
        if not (self.min_consistency_ratio >= 0 and math.isfinite(self.min_consistency_ratio)):
            problems.append(f"--min-consistency-ratio must be ≥ 0, got {self.min_consistency_ratio}")
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(metrics: dict, gates: Gates) -> list[dict]:
    """One row per gate: name, value, threshold, passed."""
    rows = [
        ("kl_topk", metrics["kl_topk"], "≤", gates.max_kl, metrics["kl_topk"] <= gates.max_kl),
        ("top1_agreement", metrics["top1_agreement"], "≥", gates.min_top1, metrics["top1_agreement"] >= gates.min_top1),
        ("greedy_match", metrics["greedy_match"], "≥", gates.min_greedy_match,
         metrics["greedy_match"] >= gates.min_greedy_match),
        ("ppl_ratio", metrics["ppl_ratio"], "≤", gates.max_ppl_ratio, metrics["ppl_ratio"] <= gates.max_ppl_ratio),
        ("consistency_ratio", metrics["consistency_ratio"], "≥", gates.min_consistency_ratio,
         metrics["consistency_ratio"] >= gates.min_consistency_ratio),
    ]
    if gates.require_determinism:
        rows.append(("deterministic", metrics["deterministic"], "=", True, bool(metrics["deterministic"])))
    return [{"gate": g, "value": v, "op": op, "threshold": t, "passed": bool(p)} for g, v, op, t, p in rows]
