"""What a run does with load paths (``--allocation loadpath``, ``--dense-layers``): per-layer sparsities for
unstructured patterns, the most load-bearing layers kept dense for n:m.

The analysis measures each layer's single-layer KL on the run's own *training* sequences (never the held-out ones
every stage is judged on), or comes from a ``loadpaths.json`` made by ``sparsekd-deploy analyze`` for this teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .allocation import allocate, default_bounds, dense_layers, dense_reasons
from .loadpaths import LoadPathReport, analyze_model, load_report
from .patterns import NM, Pattern

ANALYSIS_SEQUENCES = 16  # training sequences the in-run analysis measures single-layer KL on


@dataclass
class LoadPlan:
    report: LoadPathReport
    allocation: dict[str, float] | None = None  # unstructured: layer -> final sparsity
    dense: dict[str, str] = field(default_factory=dict)  # n:m: layer -> why it stays dense


def plan_load_paths(cfg, teacher: torch.nn.Module, teacher_dir, pattern: Pattern, train_ids: torch.Tensor,
                    calib: list[torch.Tensor]) -> LoadPlan | None:
    if cfg.allocation == "uniform" and cfg.dense_layers is None:
        return None
    if cfg.loadpaths:
        report = load_report(cfg.loadpaths, teacher_dir, pattern.spec)
    else:
        report = analyze_model(teacher, pattern, torch.cat(calib), train_ids[-ANALYSIS_SEQUENCES:],
                               importance="magnitude" if cfg.importance == "taylor" else cfg.importance,
                               include=cfg.include, exclude=cfg.exclude, batch_size=cfg.batch_size,
                               teacher=str(teacher_dir))
    plan = LoadPlan(report)
    if isinstance(pattern, NM):
        plan.dense = dense_reasons(report, dense_layers(report, cfg.dense_layers or 0))
        if cfg.sparsify_only_faster and plan.dense:  # a speed profile at hand: say what each kept layer costs
            from .speed_profile import dense_tradeoffs

            costs = dense_tradeoffs(cfg.sparsify_only_faster, list(plan.dense))
            plan.dense = {n: f"{why}; {costs[n]}" for n, why in plan.dense.items()}
    else:
        target = pattern.target_sparsity()
        plan.allocation = allocate(report, target, *default_bounds(target))
    return plan
