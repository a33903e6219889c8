"""Importance criteria: "which weights carry load". Each returns scores in [out, in] layout per layer.

Registry-based: a new criterion is one function decorated with ``@IMPORTANCE.register(name)``.
Already-pruned weights get -inf, so a stage can only add zeros to the previous stage's mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapters import PrunableLayer, mlp_blocks
from ..registry import Registry


@dataclass
class ScoringContext:
    student: nn.Module
    layers: list[PrunableLayer]
    calib: list[torch.Tensor]  # batches of input ids
    kd_loss: Callable[[torch.Tensor], torch.Tensor] | None = None  # input ids -> scalar KD loss on the student
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> keep mask (native layout)
    # Tokens per chunk of a loss over the vocabulary (fisher's cross-entropy): the run's KD chunk (0 = unchunked), or
    # None = losses.kd_chunk_tokens's automatic rule for a calibration batch.
    chunk: int | None = None
    # Wanda's ‖x‖ per layer when measured already (an FSDP run measures them on every rank, then scores one
    # gathered weight at a time on the main process); None = measured here with ``input_norms``.
    norms: dict[str, torch.Tensor] | None = None
    # Fisher's Σ per MLP output projection (layer name) when measured already (``channel_fisher``; an FSDP run
    # measures it on every rank); None = measured here.
    fisher: dict[str, torch.Tensor] | None = None
    # Taylor's |W · ∂L/∂W| per parameter name (the weight's own layout, whole) when computed already (an FSDP run
    # computes it on each rank's shard and gathers it one layer at a time: fsdp_taylor.py); None = computed here.
    taylor: dict[str, torch.Tensor] | None = None


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
    norms = ctx.norms if ctx.norms is not None else input_norms(ctx)
    return {layer.name: layer.weight_oi().detach().abs().float().cpu() * norms[layer.name][None, :]
            for layer in ctx.layers}


@IMPORTANCE.register("taylor")
def taylor(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """|W · ∂L/∂W| on the KD loss: first-order estimate of how much the loss rises if a weight is removed."""
    if ctx.taylor is not None:
        return {layer.name: _oi(layer, ctx.taylor[layer.param_name].float().cpu()) for layer in ctx.layers}
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


@IMPORTANCE.register("fisher")
def fisher(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """Channel patterns: the empirical Fisher information of a gate on each MLP channel, Σ over calibration
    sequences of (Σ over their tokens of h · ∂L/∂h)², L the sequence's next-token cross-entropy on its own tokens
    (teacher samples when data-free) and h the channel's activation entering the output projection — the
    second-order estimate of the loss a channel's removal costs (Kwon et al. 2022's mask Fisher). Wanda's |W| · ‖x‖
    summed over a channel's weights measures how large its weights and inputs are, not what its output does; this
    measures the output's effect on the model's predictions. The KD loss would not do on a first stage: at the
    dense student it equals the teacher, and its gradient is zero.

    Scores come as the output projection's [out, in] matrix whose column c sums to channel c's Fisher (input
    projections 0), so the pruner's per-channel sum is exactly the Fisher."""
    sums = ctx.fisher
    if sums is None:
        sums = channel_fisher(ctx.student, ctx.layers, ctx.calib, ctx.chunk)
    out = {}
    for layer in ctx.layers:
        s = sums.get(layer.name)
        rows = layer.shape_oi[0]
        out[layer.name] = (torch.zeros(layer.shape_oi) if s is None
                           else (s.float() / rows)[None, :].expand(rows, -1).clone())
    return out


def channel_fisher(student: nn.Module, layers: list[PrunableLayer], calib: list[torch.Tensor], chunk: int | None,
                   forward: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Fisher's Σ (float64, CPU, one per channel) per MLP output projection among ``layers``, keyed by its layer
    name. ``forward(fn)`` runs ``fn`` (a batch's forward, returning its loss): directly by default; a sharded
    student runs it inside its root's forward (fsdp_channels.sharded_fisher). The gradient at the activations is
    taken after ``forward`` returns, outside it."""
    blocks = mlp_blocks(student)
    chosen = {layer.name for layer in layers}
    blocks = [b for b in blocks if b.output.name in chosen]
    if not blocks:
        raise ValueError("fisher importance scores MLP channels: use it with a channels:S pattern")
    forward = forward or (lambda fn: fn())
    acts: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_mod, inputs):
            acts[name] = inputs[0]

        return hook

    fisher_sum = {b.output.name: torch.zeros(b.intermediate, dtype=torch.float64) for b in blocks}
    handles = [b.output.module.register_forward_pre_hook(hook_for(b.output.name)) for b in blocks]
    checked = []
    try:
        student.eval()
        with torch.enable_grad():
            for ids in calib:
                ids = ids.to(_device(student))
                per = _fisher_chunk(student, chunk, ids)

                def loss_of(ids=ids, per=per):
                    if per and not checked:  # the chunked loss is only right where logits are lm_head(hidden)
                        from ..models.lm_head import check_head

                        check_head(student, ids[:1, :8])
                        checked.append(True)
                    acts.clear()
                    return _next_token_loss(student, ids, per)

                loss = forward(loss_of)
                names = list(acts)
                grads = torch.autograd.grad(loss, [acts[n] for n in names])  # parameters' .grad stay untouched
                for name, g in zip(names, grads, strict=True):
                    gate = (g.float() * acts[name].detach().float()).sum(1)  # [batch, channels]
                    fisher_sum[name] += (gate.double() ** 2).sum(0).cpu()
                acts.clear()
    finally:
        for h in handles:
            h.remove()
    return fisher_sum


fisher.scores_channels = True  # only MLP channels (config refuses it with other patterns)


def _fisher_chunk(student: nn.Module, chunk: int | None, ids: torch.Tensor) -> int:
    """Tokens per chunk of a calibration batch's loss (0 = unchunked): the run's, else the automatic rule."""
    if chunk is not None:
        return chunk if 0 < chunk < ids[:, 1:].numel() else 0
    from .losses import kd_chunk_tokens

    head = student.get_output_embeddings()
    if head is None:  # no head to split the logits at: the model's own logits (as before)
        return 0
    return kd_chunk_tokens(None, ids[:, 1:].numel(), head.weight.shape[0])


def _next_token_loss(model: nn.Module, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Σ over a batch's positions of the next-token cross-entropy on its own tokens. Summed over the batch: sequences
    do not interact, so the gradient at a sequence's activations is its own loss's. With ``chunk`` > 0 from the final
    hidden states, ``chunk`` positions' logits at a time, each chunk checkpointed so that its backward recomputes them:
    the [tokens × vocab] logits never exist at once (a 128k vocabulary at 8 × 2048 tokens: 8.6 GB in float32)."""
    targets = ids[:, 1:].flatten()
    if not chunk:
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction="sum")
    from torch.utils.checkpoint import checkpoint

    from ..models.lm_head import final_hidden, output_head

    hidden = final_hidden(model, ids)[:, :-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = output_head(model)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(_cross_entropy_sum, h[s:s + chunk], weight, bias, targets[s:s + chunk],
                                   use_reentrant=False)
    return total


def _cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")


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
