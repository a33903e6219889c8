"""Channel pruning's own passes for a sharded student (``--fsdp``): Fisher's gate gradients (``--importance
fisher``) and the least-squares refit of the output projections (``--compensation ls``), the defaults of
``channels:S``. The single-process code (``importance.channel_fisher``, ``compensation.gram_pass`` /
``refitted``) does the arithmetic; this module runs its passes on every rank and moves whole tensors.

- **Grams** (ls): every rank runs the calibration forwards inside the root's forward (``on_student``); the main
  process alone records Hᵀ H (the activations are whole on every rank: FSDP shards parameters, not activations),
  then gathers each output projection whole, one at a time, as its copy before the prune.
- **Refit** (ls): the main process solves every block (``compensation.refitted``) after the masks are applied; each
  rank then receives only its own rows of each refitted weight from the main process (``distribute_tensor`` with
  ``src_data_rank=0``: a scatter cut by the parameter's own placement, uneven splits included).
- **Fisher**: every rank runs each calibration batch's forward inside the root's forward and takes ∂L/∂h at the
  MLP activations *after* that forward has returned. Not inside it: under FSDP2 the first unit's pre-backward hook
  queues the root's post-backward callback (``_fsdp_state.py``: ``_pre_backward`` →
  ``_register_root_post_backward_final_callback``), and that callback runs ``post_backward`` — a reshard — on every
  parameter group not yet in POST_BACKWARD, the root's included, while the root's forward is still running: the
  embeddings and head the rest of the pass reads would be swapped back to their shards under it (tried on 2 gloo
  ranks: the second calibration batch's forward then fails on every rank with "aten.embedding.default got mixed
  torch.Tensor and DTensor"). After the root's
  forward, the backward is FSDP2's ordinary one (as in a training step): the root's post-forward hooks the loss,
  each unit's pre-backward gathers its weights again, and since ``autograd.grad`` asks only for the activations'
  gradients, no parameter gets a gradient and nothing is reduce-scattered.
"""

from __future__ import annotations

import torch
from torch import nn

from .compensation import Before, check_fits, gram_pass, refitted
from .fsdp import (
    GatheredLayer,
    gathered,
    in_root,
    is_sharded,
    local_tensor,
    reshard_all,
    sharded_prune_masks,
    use_gathered,
)
from .pruner import Masks, Pruner, apply_masks


def sharded_prune_stage(team, on_student, root: nn.Module, model: nn.Module, pruner: Pruner, importance: str,
                        fraction: float, calib: list[torch.Tensor], masks: Masks,
                        allocation: dict[str, float] | None = None, compensation: str = "off",
                        chunk: int | None = None, batch_size: int | None = None) -> Masks:
    """``stage.prune_stage`` for a sharded student (``root`` the FSDP root holding ``model``): the same passes in
    the same order, on every rank; returns the masks (every rank's). ``batch_size``: the run's global batch, into
    which taylor regroups the calibration batches (fsdp_taylor.py)."""
    ls = compensation == "ls" and bool(pruner.blocks)
    before = sharded_before_prune(team, on_student, model, pruner, calib) if ls else None
    fisher = sharded_fisher(team, root, model, pruner, calib, chunk) if importance == "fisher" else None
    taylor = None
    if importance == "taylor":
        from .fsdp_taylor import sharded_taylor

        taylor = sharded_taylor(team, root, model, pruner, calib, batch_size or len(calib[0]) * team.world)
    new = sharded_prune_masks(team, on_student, model, pruner, importance, fraction, calib, masks, allocation,
                              fisher=fisher, taylor=taylor)
    apply_masks(model, new)
    if ls:
        sharded_compensate(team, pruner, before, new)
    return new


def sharded_before_prune(team, on_student, model: nn.Module, pruner: Pruner, calib: list[torch.Tensor]
                         ) -> Before | None:
    """``compensation.before_prune`` for a sharded student: the main process's ``Before`` (None on the others)."""
    team.on_main(check_fits, pruner)  # only the main process holds the grams: its memory is the one that counts
    grams: dict[str, torch.Tensor] = {}
    on_student(lambda: grams.update(gram_pass(model, pruner, calib, record=team.is_main)))
    weights: dict[str, torch.Tensor] = {}

    def keep(b, whole: torch.Tensor) -> None:
        weights[b.name] = GatheredLayer(b.output.name, b.output.module, whole).weight_oi().float().cpu().clone()

    use_gathered(team, "the ranks gathered an output projection", pruner.blocks,
                 lambda b: gathered(b.output.module.weight), keep)
    return Before(grams, weights) if team.is_main else None


def sharded_compensate(team, pruner: Pruner, before: Before | None, masks: Masks) -> None:
    """``compensation.compensate`` for a sharded student: the main process refits every block (a failure there
    reaches every rank before any rank writes), then each rank takes its own rows of each refitted weight."""
    refits: dict[str, torch.Tensor] = {}

    def refit_all() -> None:
        keeps = pruner.channel_keeps(masks)
        for b in pruner.blocks:
            refits[b.name] = b.output.to_native(refitted(before, b.name, keeps[b.name], b.output.module.weight.dtype))

    team.on_main(refit_all)
    with torch.no_grad(), team.collective("the ranks took their rows of a refitted output projection"):
        for b in pruner.blocks:
            p = b.output.module.weight
            local = local_tensor(p)
            whole = refits.pop(b.name).to(local.device) if team.is_main else torch.empty(
                tuple(p.shape), dtype=p.dtype, device=local.device)
            local.copy_(_rows_from_main(p, whole))
            del whole


def _rows_from_main(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of the main process's ``whole`` (the others pass a tensor of its shape, contents unused)."""
    if not is_sharded(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=0).to_local()


def sharded_fisher(team, root: nn.Module, model: nn.Module, pruner: Pruner, calib: list[torch.Tensor],
                   chunk: int | None) -> dict[str, torch.Tensor]:
    """``importance.channel_fisher`` on every rank of a sharded student: each batch's forward inside the root's
    forward, its gradient after (module docstring). Every rank holds the same Σ; the main process scores with its
    own."""
    from .importance import channel_fisher

    with team.collective("the ranks took the Fisher gradients of the sharded student"):
        try:
            return channel_fisher(model, pruner.layers, calib, chunk, forward=lambda fn: in_root(root, fn))
        except BaseException:
            reshard_all(root)  # a backward that raised midway leaves the units it had gathered whole
            raise
