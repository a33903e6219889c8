"""Masks chosen through the KD loss (SR-STE, Zhou et al. 2021, "Learning N:M fine-grained structured sparse neural
networks from scratch"), as the first part of a stage's training.

A one-shot criterion (Wanda: |W| · ‖x‖) picks each group's survivors from the weights *before* any training; it
cannot see what the teacher's distribution needs. Here the stage keeps a dense *latent* copy of every masked weight:

- the forward pass uses latent ⊙ mask (the student is always exactly in the pattern);
- the gradient of the masked weight updates the latent everywhere (straight-through), so a pruned weight that the
  KD loss wants back grows and can win its group's place;
- pruned latents can decay (SR-STE's "sparse-refined" term, decoupled as in AdamW) so the mask settles instead of
  flipping back and forth — off by default (``DEFAULT_DECAY``): on the demo it changed nothing measurable;
- after every step the mask is chosen again from the latents, with the same pattern, by |W| · ‖x‖ (Wanda's form, the
  activation norms taken before the prune) or |W| for magnitude importance.

At the end of the phase the mask is frozen and the student's weights are latent ⊙ mask; the stage's ordinary
recovery continues from there. Weights pruned by an earlier stage stay pruned (only this stage's share is learned).

Under FSDP (``--fsdp``) each rank keeps the latents of its own rows (a parameter's dim-0 shard) and moves them in and
out of its shard by copying (FSDP2 gathers from the storage it holds for the shard: a parameter whose ``.data`` were
swapped would be gathered stale), and holds its own rows of the masks through the phase. An n:m stage's masks are
chosen on each rank from its own rows (fsdp_nm.py: a partial stage gathers one scalar per group, not the latents), the
same masks the single process chooses. What ranks across a whole layer from the weights themselves (an unstructured
top-k, a load-path allocation, a Conv1D whose shards cut groups) is gathered to the main process after every step,
one layer at a time, which scores and chooses exactly as above, and its masks go to every rank (``fsdp.use_gathered``,
``Team.share_masks``). Each rank writes latent ⊙ its rows of the mask; the whole masks are gathered once, at
``finish``.
"""

from __future__ import annotations

import torch
from torch import nn

from .allocation import allocated_masks
from .fsdp import gathered_like, is_sharded, local_part, local_tensor, use_gathered
from .fsdp_nm import RowScorer, row_local_layers
from .pruner import Masks, Pruner

# Decoupled decay of pruned latents per unit of lr (latent ← latent · (1 − lr · DECAY)). SR-STE's λ = 2e-4 is a
# gradient term for SGD; under Adam a gradient term that small does nothing, so the decay is applied directly.
DEFAULT_DECAY = 0.0


@torch.no_grad()
def learning_start(model: nn.Module, pruner: Pruner) -> dict[str, torch.Tensor]:
    """The prunable weights (and the biases channel masks cover) before the stage's prune: the latents' start. Of a
    sharded parameter, this rank's rows (its shard)."""
    out = {}
    for layer in pruner.layers:
        out[layer.param_name] = local_tensor(layer.module.weight).detach().clone()
        bias = getattr(layer.module, "bias", None)
        if bias is not None:
            out[f"{layer.name}.bias"] = local_tensor(bias).detach().clone()
    return out


def _param_index(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


class MaskLearner:
    """SR-STE on the layers of ``pruner`` for one stage (see the module docstring).

    ``input_norms``: per layer name, ‖x‖ of each input feature over calibration activations (Wanda's factor); None
    ranks by |latent| alone (magnitude). ``frozen``: masks of earlier stages (param name → keep); those weights
    can never come back. ``allocation``: per-unit sparsities of a load-path allocation (allocation.py). ``team``:
    the run's processes (``distributed.Team``), needed when the parameters are sharded (FSDP). ``gather_all``: under
    FSDP, choose every layer's masks from gathered latents, as before n:m layers were chosen on each rank's rows
    (the reference scripts/bench_sr_ste_fsdp.py measures against).

    ``traffic`` counts the bytes of the whole tensors the phase's steps assembled under FSDP: latents gathered
    (``latent_bytes``), masks broadcast (``mask_bytes``, one byte a weight) and per-group scores gathered
    (``score_bytes``)."""

    def __init__(self, model: nn.Module, pruner: Pruner, masks: Masks, fraction: float,
                 input_norms: dict[str, torch.Tensor] | None, frozen: Masks | None = None,
                 allocation: dict[str, float] | None = None, decay: float = DEFAULT_DECAY, team=None,
                 gather_all: bool = False):
        self.team = team
        self.pruner = pruner
        self.fraction = fraction
        self.norms = input_norms
        self.frozen = frozen or {}
        self.allocation = allocation
        self.decay = decay
        self._params = _param_index(model)
        self.sharded = any(is_sharded(self._params[name]) for name in masks)
        # Under FSDP each rank holds its own rows of the masks until ``finish`` (the whole masks once per phase).
        self.masks: Masks = {k: (local_part(self._params[k], v) if self.sharded else v).clone() for k, v in masks.items()}
        self._rows: dict[str, RowScorer] = {}
        if self.sharded and not gather_all and not allocation:
            self._rows = {layer.param_name: RowScorer(layer, self._params[layer.param_name], pruner.pattern,
                                                      self.frozen.get(layer.param_name),
                                                      None if input_norms is None else input_norms[layer.name])
                          for layer in pruner.layers if layer.param_name in row_local_layers(pruner, self._params)}
        self.traffic = {"latent_bytes": 0, "mask_bytes": 0, "score_bytes": 0}
        # The latents start as the weights before this stage's prune: the teacher's (or the last stage's) values,
        # so a weight the one-shot criterion dropped keeps its size and can compete at once.
        self.latent: dict[str, torch.Tensor] = {}
        self.flips = 0  # mask entries changed over the phase (kept → pruned and back count once each)

    def start(self, dense: dict[str, torch.Tensor]) -> None:
        """``dense``: param name → weight before this stage's prune (same layout)."""
        for name in self.masks:
            self.latent[name] = dense[name].detach().to(self._params[name].device, copy=True)

    # -- around the optimizer step -------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Put the latents under the optimizer: the gradient (taken at latent ⊙ mask) updates the dense latent.
        Copied into the parameter's storage (its shard under FSDP), not swapped in: the same values either way. Then
        released: through the step the parameter is their only copy (``after_step`` takes them back from it), as with
        the swap, so the optimizer step's peak holds one copy of the prunable weights, not two."""
        for name, lat in self.latent.items():
            local_tensor(self._params[name]).copy_(lat)
        self.latent.clear()

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """Decay pruned latents, choose the masks again, and put latent ⊙ mask back into the student. The step left
        the latents in the parameters, their only copy (``before_step`` released its own): they are decayed and
        ranked there, then copied out once and the parameters masked in place — so, as with the old ``.data`` swap,
        no second copy of the weights exists while the scores are made, and one (the latents) after."""
        for name, keep in self.masks.items():
            p = self._params[name]
            lat = self.latent[name] = local_tensor(p).detach()  # the parameter's storage, not a copy
            if self.decay:
                lat.mul_(torch.where(local_part(p, keep).to(lat.device), 1.0, 1.0 - lr * self.decay))
        new = self._choose_sharded() if self.sharded else self._choose()
        for name, keep in new.items():
            self.flips += int((keep != self.masks[name]).sum())
        self.masks = new
        for name, lat in list(self.latent.items()):
            self.latent[name] = lat.clone()
            lat.mul_(local_part(self._params[name], self.masks[name]).to(device=lat.device, dtype=lat.dtype))

    def _choose_sharded(self) -> Masks:
        """This rank's rows of the new masks (a collective: every rank calls it after every step). The n:m layers
        whose rows are whole groups are chosen here (fsdp_nm.py); the others by ``_choose`` on the main process from
        each latent gathered whole (one layer at a time), its masks shared with every rank and cut to its rows."""
        new: Masks = {}
        if self._rows:
            with self.team.collective("the ranks chose the masks of their rows"):
                for name, rows in self._rows.items():
                    new[name] = rows.keep(self.latent[name], self.fraction, self.traffic)
        rest = [layer for layer in self.pruner.layers if layer.param_name not in self._rows]
        if not rest:
            return new
        whole: dict[str, torch.Tensor] = {}

        def keep(layer, t: torch.Tensor) -> None:
            whole[layer.param_name] = t.cpu()

        def gather(layer) -> torch.Tensor:
            t = gathered_like(self._params[layer.param_name], self.latent[layer.param_name])
            self.traffic["latent_bytes"] += t.numel() * t.element_size()
            return t

        use_gathered(self.team, "the ranks gathered the latents to choose the masks", rest, gather, keep)
        chosen: dict[str, Masks] = {}

        def choose() -> None:
            chosen["masks"] = self._choose(whole, rest)

        self.team.on_main(choose)
        for name, keep_whole in self.team.share_masks(chosen.get("masks", {})).items():
            self.traffic["mask_bytes"] += keep_whole.numel()
            new[name] = local_part(self._params[name], keep_whole)
        return new

    def _choose(self, latents: dict[str, torch.Tensor] | None = None, layers: list | None = None) -> Masks:
        """The masks ranked from ``latents`` (param name → whole latent; default this process's own), of ``layers``
        (default all the pruner's; a subset only where each layer's masks are its own: no allocation)."""
        latents = self.latent if latents is None else latents
        layers = self.pruner.layers if layers is None else layers
        scores = {}
        for layer in layers:
            lat = latents[layer.param_name]
            s = (lat.t() if layer.transposed else lat).detach().abs().float().cpu()
            if self.norms is not None:
                s = s * self.norms[layer.name][None, :]
            old = self.frozen.get(layer.param_name)
            if old is not None:
                s[~(old.t() if layer.transposed else old).cpu()] = float("-inf")
            scores[layer.name] = s
        if self.allocation:
            return allocated_masks(self.pruner, scores, self.fraction, self.allocation)
        return self.pruner.stage_masks(scores, self.fraction, layers=layers)

    def abandon(self) -> None:
        """After a failure that perhaps only this rank met: the latents dropped, no collective (``finish`` would wait
        for peers that are inside another one, or gone). The masks stay this rank's rows."""
        self.latent.clear()

    def finish(self) -> Masks:
        """Freeze: the student keeps latent ⊙ mask (already in place); latents are dropped. Returns the whole masks
        (on the CPU). Under FSDP a collective: every rank's rows of the masks are gathered, and ``flips`` summed
        over the ranks (each counted its own rows)."""
        self.latent.clear()
        if self.sharded:
            with self.team.collective("the ranks gathered the learned masks"):
                self.masks = {name: gathered_like(self._params[name], keep.to(torch.uint8)).bool().cpu()
                              for name, keep in self.masks.items()}
                self.flips = self.team.total(self.flips)
        return self.masks
