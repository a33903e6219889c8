"""Taylor importance (``--importance taylor``) for a sharded student (``--fsdp``): |W · ∂L/∂W| on each rank's shard.

The single-process criterion (``importance.taylor``) sums, over the calibration batches, the gradient of each batch's
KD loss and multiplies it elementwise by the weight. Under FSDP2 a backward of the root's forward leaves each
parameter's gradient as a DTensor sharded like the parameter (dim 0, the same rows), reduce-scattered with the
ranks' mean: so each calibration batch is one *global* batch, each rank running the KD loss on its share of the rows
(as a training step does), and after its backward every rank holds, for its own rows, the gradient of the loss over
the whole batch (the mean of the ranks' means over equal shares). The product with the weight is elementwise, so
each rank scores its own rows with no whole tensor; ``fsdp.sharded_prune_masks`` then gathers the scores one layer at
a time for the main process, which ranks them with the single-process code (an unstructured top-k spans the layer).
A batch whose rows the ranks cannot share evenly (a short last one) runs whole on every rank: the mean of equal
gradients is that batch's.

The training step's own path (``LossModule``'s forward, FSDP2's backward) is used, not ``autograd.grad``: FSDP2
computes with unsharded copies of the parameters and reduce-scatters their gradients in its post-backward hooks,
which only a ``backward`` into ``.grad`` runs. The gradients are dropped after each batch (no optimizer step
follows), as ``autograd.grad`` leaves ``.grad`` untouched in the single-process code.
"""

from __future__ import annotations

import torch
from torch import nn

from .fsdp import local_tensor, reshard_all


def sharded_taylor(team, root: nn.Module, model: nn.Module, pruner, calib: list[torch.Tensor], batch_size: int
                   ) -> dict[str, torch.Tensor]:
    """Per prunable weight (parameter name), |W · Σ_batches ∂L/∂W| on this rank's rows (float32, the weight's own
    layout). ``calib``: the calibration batches as every rank holds them; ``batch_size``: the global batch they
    are regrouped into (the single-process run's calibration batch). A collective: every rank calls it."""
    params = {layer.param_name: layer.module.weight for layer in pruner.layers}
    acc = {name: torch.zeros_like(local_tensor(p), dtype=torch.float32) for name, p in params.items()}
    device = next(iter(acc.values())).device
    model.eval()  # as importance.taylor scores (dropout off)
    with team.collective("the ranks took the Taylor gradients of the sharded student"):
        try:
            for batch in torch.cat(calib).split(batch_size):
                share = team.shard(batch) if len(batch) % team.world == 0 else batch
                root(share.to(device)).backward()  # the KD loss, rows=None: a top-K cache finds them by content
                for name, p in params.items():
                    if p.grad is not None:
                        acc[name] += local_tensor(p.grad).float()
                for p in root.parameters():
                    p.grad = None
        except BaseException:
            reshard_all(root)  # a backward that raised midway leaves the units it had gathered whole
            for p in root.parameters():
                p.grad = None
            raise
    return {name: (local_tensor(p).detach().float() * acc[name]).abs() for name, p in params.items()}
