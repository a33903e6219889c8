"""Pass/fail gates over validation metrics. KL gates always sit beside consistency gates: a collapsed model
is "consistent" too, so steadiness only counts while the distribution still matches the teacher.

The stability gates (``max_jitter_ratio``, ``max_sensitivity_ratio``, ``max_low_confidence_ratio``: student /
teacher, ≤ 1 = at least as steady as the teacher) are off by default; their ratios are always measured and reported
(``metrics.stability``). Where one is set it passes only when its ratio is within the threshold *and* the kl_topk
gate passes (the row says so): a stability gate never vouches for a student whose distribution has left the teacher's.
A stability gate whose measurement the bundle's references cannot give is left out (the report's note says why)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..errors import ConfigError

# gate field -> the metric it bounds
STABILITY_GATES = {"max_jitter_ratio": "jitter_ratio", "max_sensitivity_ratio": "sensitivity_ratio",
                   "max_low_confidence_ratio": "low_confidence_ratio"}


@dataclass
class Gates:
    max_kl: float = 0.25
    min_top1: float = 0.7
    min_greedy_match: float = 0.1
    max_ppl_ratio: float = 1.5
    min_consistency_ratio: float = 0.8
    require_determinism: bool = True
    max_jitter_ratio: float | None = None  # student / teacher jitter@m (1 - pairwise agreement), same τ and seeds
    max_sensitivity_ratio: float | None = None  # student / teacher KL(original‖edited prompt)
    max_low_confidence_ratio: float | None = None  # student / teacher share of positions with top-1 p < 0.3

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
        for name in STABILITY_GATES:
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                problems.append(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
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
    out = [{"gate": g, "value": v, "op": op, "threshold": t, "passed": bool(p)} for g, v, op, t, p in rows]
    kl_ok = out[0]["passed"]
    for name, metric in STABILITY_GATES.items():
        threshold, value = getattr(gates, name), metrics.get(metric)
        if threshold is None or value is None:
            continue
        row = {"gate": metric, "value": value, "op": "≤", "threshold": threshold,
               "passed": bool(value <= threshold and kl_ok), "counts_with": "kl_topk"}
        if value <= threshold and not kl_ok:
            row["note"] = "within its threshold, but kl_topk failed: a collapsed model is steady too"
        out.append(row)
    return out



def skipped_gates(metrics: dict, gates: Gates) -> list[str]:
    """One note per stability gate that was asked for but could not be applied (its measurement is missing)."""
    return [f"--{name.replace('_', '-')} not applied: {metric} was not measured on this bundle (see the notes above)"
            for name, metric in STABILITY_GATES.items()
            if getattr(gates, name) is not None and metrics.get(metric) is None]


def validate_flags(gates: dict, leave_out: dict | None = None) -> list[str]:
    """``gates`` (``Gates.to_dict()``, or the copy a bundle's manifest records, which may hold anything: these become
    a command line) as ``validate`` flags: each numeric ``max_*`` / ``min_*`` threshold (``max_kl: 0.25`` →
    ``--max-kl 0.25``), and ``--no-determinism-gate`` where ``require_determinism`` is false. ``leave_out``:
    thresholds equal to these are not repeated (validate's own defaults)."""
    leave_out = leave_out or {}
    flags = []
    for key, value in sorted(gates.items()):
        if (re.fullmatch(r"(max|min)_[a-z0-9_]+", key) and isinstance(value, (int, float))
                and not isinstance(value, bool) and leave_out.get(key) != value):
            flags += ["--" + key.replace("_", "-"), repr(float(value))]
    if gates.get("require_determinism") is False:
        flags.append("--no-determinism-gate")
    return flags
