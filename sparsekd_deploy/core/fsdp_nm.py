"""SR-STE's n:m masks (mask_learning.py) chosen on each rank's own rows under FSDP (``--fsdp``), equal to the masks
the single process ranks from whole latents, without gathering the latents.

``NM.keep_mask`` keeps, in every group of m weights along the input axis, all but its ``full`` weakest (and one more
in the ``rem`` groups whose (full+1)-th weakest weight is weakest across the layer). Scores are elementwise (|latent|
· ‖x‖, -inf where an earlier stage pruned), so a rank holding whole groups scores them exactly as the single process
does. At a full stage (``rem`` 0) the choice is the group's own; a partial stage needs only the per-group scalars
(numel / m values, not the latents): every rank gathers them and makes the same stable argsort as the single process
(ties by global group index), then keeps its own rows' share.

A rank holds whole groups when its rows are whole groups: always for an ``nn.Linear`` ([out, in], FSDP2 cuts the
rows = output features; groups lie inside a row); for GPT-2's ``Conv1D`` ([in, out]: the rows are input features)
only where every shard boundary falls on a multiple of m (``fsdp.rows_cut``). Other layers keep the gather.
"""

from __future__ import annotations

import torch

from .fsdp import gathered_rows, local_part, local_rows, rows_cut
from .patterns import NM


def row_local_layers(pruner, params: dict[str, torch.Tensor]) -> set[str]:
    """Param names of the layers whose n:m masks each rank can choose on its own rows (see the module docstring)."""
    pattern = pruner.pattern
    if not isinstance(pattern, NM) or pruner.blocks:
        return set()
    return {layer.param_name for layer in pruner.layers
            if rows_cut(params[layer.param_name], pattern.m if layer.transposed else 1)}


def weakest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` groups ``values.argsort(stable=True)[:k]`` picks (``NM.keep_mask``'s layer-wide
    choice): those below the k-th smallest value, then of those equal to it the first by index. A selection, not a
    sort of the whole layer's groups (which every rank would otherwise repeat each step)."""
    if k <= 0 or k >= values.numel() or torch.isnan(values).any():  # (NaN: the sort's own order, not a comparison's)
        chosen = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
        chosen[values.argsort(stable=True)[:k]] = True
        return chosen
    kth = values.kthvalue(k).values
    chosen = values < kth
    ties = (values == kth).nonzero().squeeze(1)
    chosen[ties[: k - int(chosen.sum())]] = True
    return chosen


class RowScorer:
    """Scores and masks of one layer's rows on this rank: the earlier stages' mask and the input norms cut once, at
    the phase's start, to the rows of this rank's shard (a Conv1D's rows are input features, so its norms are cut
    too)."""

    def __init__(self, layer, param: torch.Tensor, pattern: NM, frozen: torch.Tensor | None,
                 norms: torch.Tensor | None):
        self.layer, self.param, self.pattern = layer, param, pattern
        device = param.device
        self.frozen = None
        if frozen is not None:
            rows = local_part(param, frozen).to(device)
            self.frozen = rows.t() if layer.transposed else rows  # [out, in] layout, as the scores
        self.norms = None
        if norms is not None:
            self.norms = (local_rows(param, norms) if layer.transposed else norms).to(device)

    def scores(self, latent: torch.Tensor) -> torch.Tensor:
        """``MaskLearner._choose``'s scores of this rank's rows ([out, in] layout), with the same float operations."""
        s = (latent.t() if self.layer.transposed else latent).detach().abs().float()
        if self.norms is not None:
            s = s * self.norms[None, :]
        if self.frozen is not None:
            s[~self.frozen] = float("-inf")
        return s

    def keep(self, latent: torch.Tensor, fraction: float, traffic: dict) -> torch.Tensor:
        """This rank's rows of the layer's keep mask (native layout). A partial stage gathers the per-group scalars
        (a collective: every rank calls it for the same layer, in order) and adds their bytes to ``traffic``."""
        pattern, m = self.pattern, self.pattern.m
        s = self.scores(latent)
        groups = s.reshape(-1, m)
        full, rem = pattern.zeros_per_group(self.param.numel() // m, fraction)  # the whole layer's share
        order = groups.argsort(dim=-1, stable=True)
        prune_rank = torch.full((groups.shape[0],), full, dtype=torch.long, device=s.device)
        if rem:
            # (columns named: a rank whose shard has no rows holds [0, in / m], which a -1 cannot size)
            whole = self._whole(pattern.next_scores(groups, order, full).view(s.shape[0], s.shape[1] // m))
            traffic["score_bytes"] += whole.numel() * whole.element_size()
            chosen = weakest(whole.flatten(), rem)  # the single process's choice, from the same values
            prune_rank += self._mine(chosen.view(whole.shape)).flatten()  # (bool: 1 byte a group while whole)
        return self.layer.to_native(pattern.keep_groups(order, prune_rank).reshape(s.shape))

    def _whole(self, mine: torch.Tensor) -> torch.Tensor:
        """Every rank's per-group values ([out, groups of my rows]) gathered as the whole layer's [out, in / m]."""
        if not self.layer.transposed:  # the rows are output features: groups of a row stay in it
            return gathered_rows(self.param, mine, self.param.shape[0])
        # a Conv1D's rows are input features: m of them make one row of the [in / m, out] group grid
        return gathered_rows(self.param, mine.t(), self.param.shape[0] // self.pattern.m).t()

    def _mine(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's part ([out, groups of my rows]) of a whole [out, in / m] group grid; no communication."""
        if not self.layer.transposed:
            return local_rows(self.param, whole)
        return local_rows(self.param, whole.t().contiguous()).t()
