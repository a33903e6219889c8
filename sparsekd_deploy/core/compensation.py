"""Compensation of a channel prune: the output projection's surviving columns are refitted so that the MLP's
output on the calibration data stays as close as it can to what it was before the prune.

Removing channel c of an MLP drops ``h_c · W_down[:, c]`` from the block's output. The surviving channels' activations
are correlated with the removed ones, so part of what was lost can be carried by re-weighting them: a ridge
least-squares fit over the calibration tokens,

    W_down'[:, K] = argmin ‖H_K W'ᵀ − H Wᵀ‖² + λ‖W' − W_K‖²  =  ((H_Kᵀ H_K + λI)⁻¹ (H_Kᵀ H Wᵀ + λ W_Kᵀ))ᵀ,

with H the [tokens × channels] activations entering the output projection before the prune (channels removed by
earlier stages are zero there) and K the channels kept. λ is ``DAMP`` × the mean of the diagonal of H_Kᵀ H_K (as
SparseGPT dampens its Hessian); it keeps the fit near the kept channels' own weights where the calibration tokens
say little. Only the Gram matrix Hᵀ H is accumulated (float32), one [channels × channels] matrix per block,
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
    """What a compensation needs from the student before the prune, per MLP block: Hᵀ H (float32, CPU) of the
    activations entering the output projection, and that projection's weight ([out, in], float32, CPU).

    Float32, not float64: at real sizes the grams are the memory (TinyLlama, 22 blocks × 5632² channels: 2.8 GB in
    float32, twice that in float64; an 8 B Llama's 32 × 14336²: 26 GB), and a float64 matmul runs at 1/64 of the
    float32 rate on consumer GPUs. Each batch's gram is one float32 matmul over its tokens on the activations' device;
    only the ridge solve, one block at a time, is float64 (compensate)."""

    grams: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]


def gram_bytes(pruner: Pruner) -> int:
    """Bytes ``before_prune`` keeps on the CPU: the float32 grams and weight copies of every block, plus one batch's
    gram in flight and the float64 solve of the largest block (its gram and right-hand side)."""
    held = sum(b.intermediate * (b.intermediate + b.output.shape_oi[0]) * 4 for b in pruner.blocks)
    largest = max((b.intermediate * (b.intermediate + b.output.shape_oi[0]) for b in pruner.blocks), default=0)
    return held + largest * (4 + 8 * 2)


def check_fits(pruner: Pruner) -> None:
    """Refuse, in one line, a compensation whose grams would not fit the memory available here."""
    from ..errors import ConfigError
    from .memory import available_bytes

    need = gram_bytes(pruner)
    have = available_bytes("cpu")
    if have is not None and need > have:
        raise ConfigError([f"--compensation ls keeps a [channels × channels] gram per MLP block: {need / 2**30:.1f} "
                           f"GiB for {len(pruner.blocks)} blocks, more than the {have / 2**30:.1f} GiB of memory "
                           "available here; pass --compensation off"])


@torch.no_grad()
def before_prune(model: nn.Module, pruner: Pruner, calib: list[torch.Tensor]) -> Before:
    """One pass over the calibration batches of the student as it is before the prune. Refuses (``check_fits``)
    before the pass when the grams would not fit the memory here."""
    check_fits(pruner)
    grams = gram_pass(model, pruner, calib)
    weights = {b.name: b.output.weight_oi().detach().float().cpu().clone() for b in pruner.blocks}
    return Before(grams, weights)


@torch.no_grad()
def gram_pass(model: nn.Module, pruner: Pruner, calib: list[torch.Tensor], record: bool = True
              ) -> dict[str, torch.Tensor]:
    """Hᵀ H per block over the calibration batches (one forward each). ``record=False`` runs the same forwards and
    keeps nothing: a rank of a sharded student that must take part in every forward but not hold the grams."""
    grams: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_mod, inputs):
            h = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            g = (h.t() @ h).cpu()
            if name in grams:
                grams[name] += g
            else:
                grams[name] = g

        return hook

    handles = [b.output.module.register_forward_pre_hook(hook_for(b.name)) for b in pruner.blocks] if record else []
    device = next(model.parameters()).device
    try:
        model.eval()
        for ids in calib:
            model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
    return grams


@torch.no_grad()
def compensate(pruner: Pruner, before: Before, masks: Masks) -> None:
    """Refit each block's output projection on the channels ``masks`` keep (the removed columns become zero). One
    block at a time in float64 on the CPU, each block's gram and weight copy dropped from ``before`` once refitted,
    so at most one block's float64 solve exists at once (``before`` is spent afterwards)."""
    keeps = pruner.channel_keeps(masks)
    for b in pruner.blocks:
        w = b.output.weight_oi()  # a view: Conv1D's transposed weight too
        w.copy_(refitted(before, b.name, keeps[b.name], w.dtype).to(w.device))


@torch.no_grad()
def refitted(before: Before, name: str, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Block ``name``'s refitted output projection, whole, [out, in], on the CPU in ``dtype``: the ridge fit on the
    ``keep`` channels, zero in the removed columns. Pops the block's gram and weight copy from ``before``."""
    keep = keep.cpu()
    g = before.grams.pop(name)
    wt = before.weights.pop(name).t()  # [channels, hidden], the removed channels' columns still in it
    gk = g[keep].double()  # [kept, channels]
    del g
    gkk = gk[:, keep]
    lam = DAMP * gkk.diagonal().mean().clamp_min(1e-12)
    wt64 = wt.double()
    # the ridge pulls the fit toward the weights the kept channels had, not toward zero
    gkk.diagonal().add_(lam)
    fitted = torch.linalg.solve(gkk, gk @ wt64 + lam * wt64[keep])
    del gk, gkk, wt64
    new = torch.zeros((wt.shape[1], wt.shape[0]), dtype=dtype)
    new[:, keep] = fitted.t().to(dtype)
    return new
