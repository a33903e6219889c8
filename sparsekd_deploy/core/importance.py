"""Importance criteria: "which weights carry load". Each returns scores in [out, in] layout per layer.

Registry-based: a new criterion is one function decorated with ``@IMPORTANCE.register(name)``.
Already-pruned weights get -inf, so a stage can only add zeros to the previous stage's mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.adapters import PrunableLayer
from ..registry import Registry


@dataclass
class ScoringContext:
    student: nn.Module
    layers: list[PrunableLayer]
    calib: list[torch.Tensor]  # batches of input ids
    kd_loss: Callable[[torch.Tensor], torch.Tensor] | None = None  # input ids -> scalar KD loss on the student
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> keep mask (native layout)


Criterion = Callable[[ScoringContext], dict[str, torch.Tensor]]
IMPORTANCE: Registry[Criterion] = Registry("importance criterion")


@IMPORTANCE.register("magnitude")
def magnitude(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """|W|."""
    return {layer.name: layer.weight_oi().detach().abs().float().cpu() for layer in ctx.layers}


@torch.no_grad()
def input_norms(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Per layer, the L2 norm of each input feature over the calibration activations (Wanda's ‖x‖)."""
    sq = {layer.name: None for layer in ctx.layers}

    def hook_for(name):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            s = (x * x).sum(0).cpu()
            sq[name] = s if sq[name] is None else sq[name] + s

        return hook

    handles = [layer.module.register_forward_hook(hook_for(layer.name)) for layer in ctx.layers]
    try:
        ctx.student.eval()
        for ids in ctx.calib:
            ctx.student(input_ids=ids.to(_device(ctx.student)))
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in sq.items()}


@IMPORTANCE.register("wanda")
@torch.no_grad()
def wanda(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """|W| · ‖x‖: weight size times the L2 norm of its input feature over calibration activations."""
    norms = input_norms(ctx)
    return {layer.name: layer.weight_oi().detach().abs().float().cpu() * norms[layer.name][None, :]
            for layer in ctx.layers}


@IMPORTANCE.register("taylor")
def taylor(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """|W · ∂L/∂W| on the KD loss: first-order estimate of how much the loss rises if a weight is removed."""
    if ctx.kd_loss is None:
        raise ValueError("taylor importance needs the KD loss")
    params = [layer.module.weight for layer in ctx.layers]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    ctx.student.eval()
    for ids in ctx.calib:
        g = torch.autograd.grad(ctx.kd_loss(ids), params, allow_unused=True)
        for acc, gi in zip(grads, g, strict=True):
            if gi is not None:
                acc += gi.float()
    return {
        layer.name: _oi(layer, (p.detach().float() * acc).abs().cpu())
        for layer, p, acc in zip(ctx.layers, params, grads, strict=True)
    }


def _oi(layer: PrunableLayer, native: torch.Tensor) -> torch.Tensor:
    return native.t() if layer.transposed else native


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def score(criterion: str, ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Score every layer; weights already masked get -inf so they stay pruned."""
    scores = IMPORTANCE.get(criterion)(ctx)
    for layer in ctx.layers:
        keep = ctx.masks.get(layer.param_name)
        if keep is not None:
            s = scores[layer.name]
            s[~_oi(layer, keep.cpu())] = float("-inf")
    return scores
