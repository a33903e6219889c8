"""Compensation of a channel prune: the output projection's surviving columns are refitted so that the MLP's
output on the calibration data stays as close as it can to what it was before the prune.

Removing channel c of an MLP drops ``h_c · W_down[:, c]`` from the block's output. The surviving channels' activations
are correlated with the removed ones, so part of what was lost can be carried by re-weighting them: a ridge
least-squares fit over the calibration tokens,

    W_down'[:, K] = argmin ‖H_K W'ᵀ − H Wᵀ‖² + λ‖W' − W_K‖²  =  ((H_Kᵀ H_K + λI)⁻¹ (H_Kᵀ H Wᵀ + λ W_Kᵀ))ᵀ,

with H the [tokens × channels] activations entering the output projection before the prune (channels removed by
earlier stages are zero there) and K the channels kept. λ is ``DAMP`` × the mean of the diagonal of H_Kᵀ H_K (as
SparseGPT dampens its Hessian); it keeps the fit near the kept channels' own weights where the calibration tokens
say little. Only the Gram matrix Hᵀ H is accumulated, one [channels × channels] matrix per block,
from one pass over the calibration batches of the student as it is before the prune. The same idea as the weight
updates of OBS / SparseGPT, here for whole channels and with a closed form (the "output reconstruction" of
structured-pruning work such as FLAP's bias compensation, taken to the full projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .pruner import Masks, Pruner

DAMP = 0.01


@dataclass
class Before:
    """What a compensation needs from the student before the prune, per MLP block: Hᵀ H (float64, CPU) of the
    activations entering the output projection, and that projection's weight ([out, in], float64, CPU)."""

    grams: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]


@torch.no_grad()
def before_prune(model: nn.Module, pruner: Pruner, calib: list[torch.Tensor]) -> Before:
    """One pass over the calibration batches of the student as it is before the prune."""
    grams: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_mod, inputs):
            h = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            g = (h.t() @ h).cpu()
            grams[name] = g if name not in grams else grams[name] + g

        return hook

    handles = [b.output.module.register_forward_pre_hook(hook_for(b.name)) for b in pruner.blocks]
    device = next(model.parameters()).device
    try:
        model.eval()
        for ids in calib:
            model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
    weights = {b.name: b.output.weight_oi().detach().double().cpu().clone() for b in pruner.blocks}
    return Before(grams, weights)


@torch.no_grad()
def compensate(pruner: Pruner, before: Before, masks: Masks) -> None:
    """Refit each block's output projection on the channels ``masks`` keep (the removed columns become zero)."""
    keeps = pruner.channel_keeps(masks)
    for b in pruner.blocks:
        keep = keeps[b.name].cpu()
        g = before.grams[b.name]
        gkk = g[keep][:, keep]
        lam = DAMP * gkk.diagonal().mean().clamp_min(1e-12)
        wt = before.weights[b.name].t()  # [channels, hidden], the removed channels' columns still in it
        # the ridge pulls the fit toward the weights the kept channels had, not toward zero
        fitted = torch.linalg.solve(gkk + lam * torch.eye(len(gkk), dtype=gkk.dtype), g[keep] @ wt + lam * wt[keep])
        w = b.output.weight_oi()  # a view: Conv1D's transposed weight too
        new = torch.zeros(w.shape, dtype=torch.float64)
        new[:, keep] = fitted.t()
        w.copy_(new.to(device=w.device, dtype=w.dtype))
