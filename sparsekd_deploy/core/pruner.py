"""Turns importance scores into keep-masks for a stage, enforces them, and audits the result.

Masks are keyed by parameter name and stored in the parameter's own layout (bool, True = keep), so
enforcing them after an optimizer step is one multiply per parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import IntegrityError, PatternError
from ..models.adapters import DEFAULT_EXCLUDE, MLPBlock, embedding_tied, mlp_blocks, prunable_layers, shrink_mlp
from .patterns import Channels, Pattern

Masks = dict[str, torch.Tensor]


class Pruner:
    def __init__(self, model: nn.Module, pattern: Pattern, include=("*",), exclude=DEFAULT_EXCLUDE,
                 keep_dense: dict[str, str] | None = None):
        self.pattern = pattern
        self.skipped: dict[str, str] = {}
        keep_dense = keep_dense or {}
        self.blocks: list[MLPBlock] = []
        if isinstance(pattern, Channels):
            self.blocks = mlp_blocks(model)
            if not self.blocks:
                raise PatternError(f"pattern {pattern.spec} found no MLP block in this model")
            self.layers = [layer for b in self.blocks for layer in (*b.inputs, b.output)]
        else:
            candidates = prunable_layers(model, include, exclude)
            tied = {name: f"tied to the embedding {emb}: kept dense" for name, emb in embedding_tied(model).items()}
            self.layers = []
            for layer in candidates:
                reason = keep_dense.get(layer.name) or tied.get(layer.name) or pattern.skip_reason(*layer.shape_oi)
                if reason:
                    self.skipped[layer.name] = reason
                else:
                    self.layers.append(layer)
            if not self.layers:
                detail = "; ".join(f"{n}: {r}" for n, r in list(self.skipped.items())[:3]) or "no Linear/Conv1D layer matched"
                raise PatternError(f"pattern {pattern.spec} fits no layer of this model ({detail})")

    def stage_masks(self, scores: dict[str, torch.Tensor], fraction: float,
                    patterns: dict[str, Pattern | None] | None = None, layers: list | None = None) -> Masks:
        """Keep-masks (native layout) for ``fraction`` of the final pattern. ``patterns`` overrides the pruner's
        pattern per layer (per MLP block for channels), e.g. a load-path allocation; a None value keeps it dense.
        ``layers``: only these of the pruner's layers (default all; not for channels, whose blocks span layers)."""
        patterns = patterns or {}
        if self.blocks:
            return self._channel_masks(scores, fraction, patterns)
        masks: Masks = {}
        for layer in self.layers if layers is None else layers:
            pat = patterns.get(layer.name, self.pattern)
            keep = (torch.ones(layer.shape_oi, dtype=torch.bool) if pat is None
                    else pat.keep_mask(scores[layer.name], fraction))
            masks[layer.param_name] = layer.to_native(keep)
        return masks

    def _channel_masks(self, scores, fraction, patterns) -> Masks:
        masks: Masks = {}
        for block in self.blocks:
            # A channel's load: its rows in every input projection plus its column in the output projection.
            ch = sum(scores[layer.name].sum(1) for layer in block.inputs) + scores[block.output.name].sum(0)
            keep = patterns.get(block.name, self.pattern).channel_keep(ch, fraction)
            for layer in block.inputs:
                masks[layer.param_name] = layer.to_native(keep[:, None].expand(layer.shape_oi).clone())
                if getattr(layer.module, "bias", None) is not None:
                    masks[f"{layer.name}.bias"] = keep.clone()
            masks[block.output.param_name] = block.output.to_native(keep[None, :].expand(block.output.shape_oi).clone())
        return masks

    def channel_keeps(self, masks: Masks) -> dict[str, torch.Tensor]:
        """Per MLP block, which intermediate channels survive (read back from the masks)."""
        return {b.name: masks[b.output.param_name].any(0 if not b.output.transposed else 1) for b in self.blocks}


def _param_index(model: nn.Module) -> dict[str, nn.Parameter]:
    # remove_duplicate=False: a tied weight (lm_head ↔ embeddings) is reachable under both names.
    return dict(model.named_parameters(remove_duplicate=False))


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero what ``masks`` prune. A parameter sharded by FSDP (fsdp.py) takes its own rows of a whole mask (or a mask
    ``device_masks`` cut for it already)."""
    from .fsdp import local_part, local_tensor

    params = _param_index(model)
    for name, keep in masks.items():
        p = params[name]
        target = local_tensor(p)
        target.mul_(local_part(p, keep).to(device=target.device, dtype=target.dtype))


def device_masks(model: nn.Module, masks: Masks, device) -> Masks:
    """``masks`` on ``device``, each cut to this rank's shard of a sharded parameter: what ``apply_masks`` needs at
    every step, made once."""
    from .fsdp import local_part

    params = _param_index(model)
    return {k: local_part(params[k], v.to(device)) for k, v in masks.items()}


@torch.no_grad()
def check_integrity(model: nn.Module, masks: Masks) -> int:
    """Prove that every pruned weight is exactly zero; returns how many zeros were checked."""
    params = _param_index(model)
    checked = 0
    bad = []
    for name, keep in masks.items():
        pruned = params[name].detach().cpu()[~keep.cpu()]
        checked += pruned.numel()
        if pruned.numel() and (pruned != 0).any():
            bad.append(f"{name}: {(pruned != 0).sum().item()} non-zero pruned weights")
    if bad:
        raise IntegrityError("mask integrity check failed: " + "; ".join(bad[:5]))
    return checked


def sparsity_report(pruner: Pruner, model: nn.Module) -> dict:
    """Per layer: pattern, achieved sparsity, whether the final pattern holds; skipped layers and why."""
    layers = {}
    total = zeros = 0
    for layer in pruner.layers:
        w = layer.weight_oi().detach().cpu()
        z = int((w == 0).sum())
        total += w.numel()
        zeros += z
        entry = {"pattern": pruner.pattern.spec, "shape_out_in": list(w.shape), "sparsity": round(z / w.numel(), 6)}
        if not pruner.blocks:
            entry["pattern_holds"] = pruner.pattern.holds(w)
        layers[layer.name] = entry
    return {
        "pattern": pruner.pattern.spec,
        "overall_sparsity": round(zeros / total, 6) if total else 0.0,
        "layers": layers,
        "skipped": dict(pruner.skipped),
    }


def final_report(pruner: Pruner, model: nn.Module, masks: Masks, complete: bool) -> dict:
    """The finished student's ``sparsity_report``, after proving every pruned weight zero, and that a completed n:m
    run holds its pattern in every layer (IntegrityError otherwise). A channel pattern's MLPs are shrunk to the
    channels they keep (``intermediate_size`` in the report)."""
    from .patterns import NM

    zeros = check_integrity(model, masks)
    report = sparsity_report(pruner, model)
    report.update({"reached_target": complete, "pruned_weights_verified_zero": zeros})
    if isinstance(pruner.pattern, NM) and complete:
        lost = [n for n, e in report["layers"].items() if not e.get("pattern_holds", True)]
        if lost:
            raise IntegrityError(f"{pruner.pattern.spec} does not hold in {len(lost)} layer(s): {', '.join(lost[:3])}")
    if pruner.blocks and masks:
        report["intermediate_size"] = shrink_mlp(model, pruner.channel_keeps(masks))
    return report
