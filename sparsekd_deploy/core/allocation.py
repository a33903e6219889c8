"""Sparsity allocated by load path (from a ``loadpaths.json``, see ``loadpaths.py``).

Unstructured and channel patterns: ``allocate`` gives each unit (layer; MLP block for channels) its own sparsity —
less where the single-unit KL is high, more where it is low — such that the parameter-weighted mean is the global
target, within per-unit bounds. The map is OWL-style: one monotone function of the load with a scalar offset,
found by bisection so the global sparsity is hit exactly:

    s_u(t) = clip(t · w_u, lo_u, hi_u),   w_u = (params_u / kl_u) ** strength  (normalised to geometric mean 1)

It is the least-total-damage allocation for the global sparsity when a unit's KL grows like kl_u · (s / S)^γ, with
strength = 1/(γ-1): of two units of the same size the one with the higher KL is pruned less, and of two with the
same KL the larger gives more (its weights count more towards the global share). The default strength 0.1 (a
steep γ = 11: damage rises sharply past a unit's comfort zone, and single-unit KLs do not simply add up) was the
best of {0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1} on the demo teacher at unstructured:0.7, bounds
[0.5, 0.9] (``default_bounds``), one-shot wanda, one seed, held-out KL 0.825 × the uniform allocation's; 0.5 and 1 were
worse than uniform (1.12 ×, 1.36 ×), so keep it small.

n:m has no continuous sparsity: ``dense_layers`` keeps the K most load-bearing layers dense instead ("auto": those
whose single-layer KL exceeds ``factor`` × the median, at most ``max_share`` of the layers).
"""

from __future__ import annotations

import math

import torch

from ..errors import SparseKDError
from .loadpaths import LoadPathReport
from .patterns import NM, Channels, Unstructured, make_pattern
from .pruner import Masks, Pruner

Bound = float | dict[str, float]


class AllocationError(SparseKDError):
    """Allocation bounds that cannot reach the target, or an allocation the pattern does not support."""


def _bound(b: Bound, name: str, default: float) -> float:
    return float(b.get(name, default) if isinstance(b, dict) else b)


def allocate(report: LoadPathReport, global_sparsity: float, min_sparsity: Bound = 0.0, max_sparsity: Bound = 0.95,
             *, strength: float = 0.1, per_param: bool = True, tol: float = 1e-9) -> dict[str, float]:
    """Per-unit sparsity (unit names as in the report) whose parameter-weighted mean is ``global_sparsity``.

    ``min_sparsity`` / ``max_sparsity``: one bound for every unit, or a dict {unit: bound} (units not in it get
    0 / 0.95). ``strength`` = 0 gives the uniform allocation; ``per_param=False`` drops the size factor from w_u
    (worse on the demo: 0.86 × vs 0.83 × uniform at strength 0.1). Raises AllocationError when the bounds cannot reach
    the target (naming the reachable range) or for an n:m report."""
    if isinstance(make_pattern(report.pattern), NM):
        raise AllocationError(f"pattern {report.pattern} has no continuous sparsity to allocate; keep load-bearing "
                              "layers dense instead (dense_layers / --dense-layers K|auto)")
    if not report.layers:
        raise AllocationError("the load-path report lists no layer")
    if not 0.0 < global_sparsity < 1.0:
        raise AllocationError(f"global sparsity must be in (0, 1), got {global_sparsity}")
    if not (math.isfinite(strength) and strength >= 0):
        raise AllocationError(f"strength must be ≥ 0, got {strength}")
    names = [ly.name for ly in report.layers]
    lo = torch.tensor([_bound(min_sparsity, n, 0.0) for n in names], dtype=torch.float64)
    hi = torch.tensor([_bound(max_sparsity, n, 0.95) for n in names], dtype=torch.float64)
    bad = [n for n, a, b in zip(names, lo.tolist(), hi.tolist(), strict=True) if not 0.0 <= a <= b < 1.0]
    if bad:
        raise AllocationError(f"bounds need 0 ≤ min ≤ max < 1 for every layer; not so for {', '.join(bad[:3])}"
                              + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    p = torch.tensor([float(ly.params) for ly in report.layers], dtype=torch.float64)
    share = p / p.sum()
    reach_lo, reach_hi = float((share * lo).sum()), float((share * hi).sum())
    if not reach_lo - 1e-12 <= global_sparsity <= reach_hi + 1e-12:
        raise AllocationError(f"per-layer bounds [{_fmt(min_sparsity)}, {_fmt(max_sparsity)}] reach a global "
                              f"sparsity of {reach_lo:.4f}..{reach_hi:.4f} only, not {global_sparsity:g}; widen them")
    kl = torch.tensor([ly.kl for ly in report.layers], dtype=torch.float64)
    floor = max(float(kl[kl > 0].min()) if (kl > 0).any() else 1.0, 1e-12) * 1e-3  # a lossless unit: cheapest, finite
    w = ((p if per_param else 1.0) / kl.clamp_min(floor)) ** strength
    w = w / w.log().mean().exp()

    def mean_at(t: float) -> float:
        return float((share * (t * w).clamp(lo, hi)).sum())

    a, b = 0.0, float((hi / w).max()) * 1.0001
    for _ in range(200):  # bisection on the scalar offset; mean_at is monotone non-decreasing in t
        m = 0.5 * (a + b)
        if mean_at(m) < global_sparsity:
            a = m
        else:
            b = m
        if b - a < tol * max(b, 1e-12):
            break
    t = 0.5 * (a + b)
    s = (t * w).clamp(lo, hi)
    return {n: float(v) for n, v in zip(names, s.tolist(), strict=True)}


def default_bounds(global_sparsity: float, spread: float = 0.2) -> tuple[float, float]:
    """Per-unit bounds around the target: [S - spread, S + spread], within [0, 0.95]."""
    return max(0.0, global_sparsity - spread), min(0.95, global_sparsity + spread)


def _fmt(b: Bound) -> str:
    if isinstance(b, dict):
        return "per-layer"
    return f"{b:g}"


def global_sparsity_of(report: LoadPathReport, allocation: dict[str, float]) -> float:
    """Parameter-weighted mean of an allocation over the report's units."""
    total = sum(ly.params for ly in report.layers)
    return sum(ly.params * allocation[ly.name] for ly in report.layers) / total


# -- n:m: keep the most load-bearing layers dense ---------------------------------------------------------------
AUTO_FACTOR = 3.0
AUTO_MAX_SHARE = 0.25


def dense_layers(report: LoadPathReport, k: int | str, *, factor: float = AUTO_FACTOR,
                 max_share: float = AUTO_MAX_SHARE) -> list[str]:
    """The ``k`` most load-bearing layers, heaviest first. ``k="auto"``: the layers whose single-layer KL exceeds
    ``factor`` × the median single-layer KL (an outlier rule: a layer several times costlier than a typical one
    is a load path), capped at ``max_share`` of the layers so "auto" never keeps most of the model dense."""
    ranked = report.ranked()
    if k == "auto":
        med = report.median_kl()
        heavy = [ly.name for ly in ranked if ly.kl > factor * med]
        return heavy[: int(max_share * len(ranked))]
    if isinstance(k, str):
        try:
            k = int(k)
        except ValueError:
            raise AllocationError(f"--dense-layers takes a count or auto, got {k!r}") from None
    if not 0 <= k <= len(ranked):
        raise AllocationError(f"--dense-layers {k}: the report has {len(ranked)} layers; pass 0..{len(ranked)} or auto")
    return [ly.name for ly in ranked[:k]]


def dense_reasons(report: LoadPathReport, names: list[str]) -> dict[str, str]:
    """{layer: why it stays dense}, the ``keep_dense`` argument of ``Pruner``."""
    med = report.median_kl()
    rank = {ly.name: i + 1 for i, ly in enumerate(report.ranked())}
    loads = report.by_name()
    out = {}
    for n in names:
        kl = loads[n].kl
        ratio = f", {kl / med:.1f}× the median" if med > 0 else ""
        out[n] = f"kept dense: load path #{rank[n]} (single-layer KL {kl:.4g} at {report.pattern}{ratio})"
    return out


# -- masks for a stage under an allocation --------------------------------------------------------------------
def allocated_masks(pruner: Pruner, scores: dict[str, torch.Tensor], fraction: float,
                    allocation: dict[str, float]) -> Masks:
    """``pruner.stage_masks`` with each unit at its allocated sparsity (``fraction`` of it, as stages ramp up);
    units not in ``allocation`` keep the pruner's pattern. For channels the units are MLP blocks."""
    if isinstance(pruner.pattern, NM):
        raise AllocationError(f"pattern {pruner.pattern.spec} has no continuous sparsity; use dense_layers")
    if pruner.blocks:
        patterns = {name: Channels(sp) for name, sp in allocation.items()}
    else:
        patterns = {name: Unstructured(sp) if sp > 0 else None for name, sp in allocation.items()}
    return pruner.stage_masks(scores, fraction, patterns)
