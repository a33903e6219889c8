"""One stage of a staged run, in the three steps the distiller chains: prune to the stage's share of the pattern,
recover (``recovery.py``), record what happened."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .allocation import allocated_masks
from .compensation import before_prune, compensate
from .importance import ScoringContext, score
from .pruner import Masks, Pruner, apply_masks
from .recovery import Recovery
from .schedule import Stage


def prune_stage(model: nn.Module, pruner: Pruner, importance: str, fraction: float, calib: list[torch.Tensor],
                masks: Masks, kd_loss: Callable[[torch.Tensor], torch.Tensor],
                allocation: dict[str, float] | None = None, compensation: str = "off", chunk: int | None = None) -> Masks:
    """Score the current student and zero the weights outside ``fraction`` of the final pattern (each layer at its
    own sparsity under a load-path ``allocation``); under ``compensation`` "ls" a channel prune then refits the
    output projections on the channels kept (compensation.py). ``chunk``: the run's KD chunk, which a loss over
    the vocabulary in the scoring keeps to (``importance.ScoringContext``). Returns the masks."""
    before = before_prune(model, pruner, calib) if compensation == "ls" and pruner.blocks else None
    ctx = ScoringContext(model, pruner.layers, calib, masks=masks, kd_loss=kd_loss, chunk=chunk)
    new = stage_masks(pruner, score(importance, ctx), fraction, allocation)
    apply_masks(model, new)
    if before is not None:
        compensate(pruner, before, new)
    return new


def stage_masks(pruner: Pruner, scores: dict[str, torch.Tensor], fraction: float,
                allocation: dict[str, float] | None = None) -> Masks:
    """The keep-masks of ``fraction`` of the final pattern from ``scores`` (per layer under a load-path allocation)."""
    return allocated_masks(pruner, scores, fraction, allocation) if allocation else pruner.stage_masks(scores, fraction)


@dataclass
class StageOutcome:
    """What the recovery of one stage gave: the best held-out state, the lr it trained at, and the verdict."""

    kl_after_prune: float
    lr: float
    recovery: Recovery
    attempts: int = 0
    accepted: bool = False
    error: str | None = None  # why training stopped early (a non-finite loss)
    mask_learning: dict | None = None  # what the stage's mask-learning phase did (its steps are part of the stage's)
    demolition: dict | None = None  # a gradual demolition's fade (its steps are counted in the recovery's)
    lr_search: dict | None = None  # the run's lr range test, on the first stage (its steps are extra, not the stage's)


def stage_record(stage: Stage, outcome: StageOutcome, sparsity: float, tokens_per_second: float) -> dict:
    """The stage's trajectory entry. ``kl``/``top1`` are the best held-out state's (the one the stage keeps);
    ``best_step`` is where it was measured (0 = right after the prune: training did not improve on it); ``lr`` is
    the stage's peak learning rate; ``checkpoints`` lists [step, held-out KL] of every measurement."""
    rec = outcome.recovery
    trained = rec.steps > 0
    return {
        "stage": stage.index, "label": stage.label, "fraction": stage.fraction, "sparsity": sparsity,
        "kl": rec.metrics["kl"] if trained else None, "kl_after_prune": outcome.kl_after_prune,
        "top1": rec.metrics["top1"] if trained else None,
        "steps": rec.steps + (outcome.mask_learning["steps"] if outcome.mask_learning else 0),
        "attempts": outcome.attempts, "accepted": outcome.accepted,
        "lr": outcome.lr, "best_step": rec.step, "checkpoints": rec.checkpoints,
        "tokens_per_second": round(tokens_per_second, 1),
        # the kept state's held-out confidence (same passes as its KL); an accepted stage turns it into "stability"
        "confidence": {k: rec.metrics.get(k) for k in ("low_confidence", "teacher_low_confidence", "ece")},
        **({"mask_learning": outcome.mask_learning} if outcome.mask_learning else {}),
        **({"demolition": outcome.demolition} if outcome.demolition else {}),
        **({"lr_search": outcome.lr_search} if outcome.lr_search else {}),
    }


def stop_reason(stage: Stage, outcome: StageOutcome, kl_budget: float, retries: int) -> str:
    if outcome.error:
        return outcome.error
    return (f"stage {stage.label} stayed above the KL budget ({outcome.recovery.metrics['kl']:.4f} > {kl_budget}) "
            f"after {retries} retries")
