"""Divergences between softened teacher and student distributions (log-probs over the last dim)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..numerics import kl_torch, log_softmax_torch
from ..registry import Registry, split_spec
from .operators import Operator

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logP, logQ) -> per-position loss
LOSSES: Registry[Callable[[str | None], LossFn]] = Registry("loss")


@LOSSES.register("forward-kl")
def _forward(_arg=None) -> LossFn:
    """KL(P‖Q): mass-covering; the classic KD loss."""
    return lambda logp, logq: kl_torch(logp, logq)


@LOSSES.register("reverse-kl")
def _reverse(_arg=None) -> LossFn:
    """KL(Q‖P): mode-seeking; tends to make the student sharper than the teacher."""
    return lambda logp, logq: kl_torch(logq, logp)


@LOSSES.register("js")
def _js(_arg=None) -> LossFn:
    """Jensen-Shannon: symmetric and bounded by log 2."""

    def js(logp, logq):
        logm = torch.logaddexp(logp, logq) - torch.log(torch.tensor(2.0, dtype=logp.dtype))
        return 0.5 * kl_torch(logp, logm) + 0.5 * kl_torch(logq, logm)

    return js


@LOSSES.register("mixed")
def _mixed(arg=None) -> LossFn:
    """α·KL(P‖Q) + (1-α)·KL(Q‖P); 'mixed:0.5' by default."""
    alpha = 0.5 if arg is None else float(arg)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError([f"loss mixed:α needs 0 ≤ α ≤ 1, got {alpha}"])
    return lambda logp, logq: alpha * kl_torch(logp, logq) + (1 - alpha) * kl_torch(logq, logp)


def make_loss(spec: str) -> LossFn:
    name, arg = split_spec(spec)
    factory = LOSSES.get(name)
    try:
        return factory(arg)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError([f"loss {spec!r}: {e}"]) from None


def kd_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    operator: Operator,
    loss_fn: LossFn,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over positions of loss(F(P), F(Q)), scaled by the operator's factor (T² for power)."""
    logp = log_softmax_torch(teacher_logits.float())
    logq = log_softmax_torch(student_logits.float())
    P, Q = operator.pair(logp, logq)
    per_pos = loss_fn(P, Q)
    if mask is not None:
        per_pos = per_pos[mask.bool()]
    return operator.loss_scale * per_pos.mean()
