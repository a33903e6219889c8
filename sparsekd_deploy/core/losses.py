"""Divergences between softened teacher and student distributions (log-probs over the last dim)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..numerics import head_buckets_torch, kl_torch, log_softmax_torch
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


class _GatheredLogSoftmax(torch.autograd.Function):
    """``log_softmax(z).gather(-1, idx)`` for the K outcomes of a top-K teacher, without a [tokens × vocab]
    log-softmax kept for the backward: it saves ``z`` (the logits) and the log-normaliser, and forms the one
    [tokens × vocab] gradient in place in the backward — one such tensor alive beside the logits instead of two
    (log-softmax's saved output and the gather's zero-filled gradient) before log-softmax's own backward adds a third."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        lse = z.logsumexp(-1, keepdim=True)
        ctx.save_for_backward(z, idx, lse)
        return z.gather(-1, idx) - lse

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, idx, lse = ctx.saved_tensors
        # d(z_i - lse)/dz_j = [i = j] - softmax_j
        grad = (z - lse).exp_().mul_(-g.sum(-1, keepdim=True))
        return grad.scatter_add_(-1, idx, g), None


def student_buckets(student_logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The student's buckets on the teacher's outcomes ``idx`` [..., K] (``numerics.bucket_torch`` of its
    log-softmax, in float32), with the memory of :class:`_GatheredLogSoftmax`."""
    return head_buckets_torch(_GatheredLogSoftmax.apply(student_logits.float(), idx))


def bucket_kd_loss(idx: torch.Tensor, p_buckets: torch.Tensor, student_logits: torch.Tensor, loss_fn: LossFn,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of loss(P_b, Q_b) against a teacher given only as top-K buckets (a top-K cache, an API
    teacher): ``p_buckets`` [..., K+1] on the outcomes ``idx`` [..., K]. The same number as :func:`kd_loss` with the
    ``topk:K`` operator on the full teacher: ``TopK.pair`` buckets the teacher exactly as the cache stores it and the
    student on the same outcomes (``numerics.bucket_torch``); its loss scale is 1."""
    per_pos = loss_fn(p_buckets, student_buckets(student_logits, idx))
    if mask is not None:
        per_pos = per_pos[mask.bool()]
    return per_pos.mean()


# -- chunked over tokens: full [tokens × vocab] logits never exist at once -----------------------------------------
# Why our own and not a library: Liger-Kernel's fused linear distillation losses (LigerFusedLinearJSD and its chunked
# base) and Apple's cut-cross-entropy are Triton kernels for CUDA (both packages require triton), cover forward/reverse
# KL, JSD and cross-entropy on logits only — not the probability-domain operators (power, mix, top-k + tail bucket),
# the mixed loss, nor a teacher given as top-K buckets from disk — and torch's own linear_cross_entropy takes the
# teacher as full [tokens × vocab] probabilities. So: plain PyTorch, one checkpointed function per chunk of tokens
# (torch.utils.checkpoint): the forward keeps only each chunk's scalar, the backward recomputes one chunk's logits at a
# time, the teacher's (from its hidden states and lm_head, under no_grad) included. Runs on CPU and GPU alike.

# Auto chunking (kd_chunk None): chunk when one float32 copy of a batch's logits would exceed KD_CHUNK_AUTO_OVER; the
# loss of a batch holds ~10-15 such copies at its peak (log-softmax, operator, KL and their gradients), so 256 MiB keeps
# the unchunked loss within a few GB. A chunk is sized so one float32 [chunk × vocab] copy takes KD_CHUNK_BYTES.
KD_CHUNK_AUTO_OVER = 256 << 20
KD_CHUNK_BYTES = 32 << 20
# float32 [tokens × vocab] copies the unchunked loss step holds at its peak, teacher logits included (forward-KL,
# power:1): scripts/bench_memory.py measured a 10.4 GB rise for a step whose logits take 1 GiB a copy (AdamW state
# included). Used to refuse --kd-chunk 0 where the loss cannot fit.
KD_LOSS_COPIES = 10


def kd_chunk_tokens(setting: int | None, tokens: int, vocab: int) -> int:
    """Tokens per chunk for a batch of ``tokens`` positions over ``vocab``; 0 = unchunked. ``setting``: the config's
    ``kd_chunk`` (None = automatic by the size of the logits, 0 = off, N = N tokens)."""
    if setting is not None:
        return 0 if setting <= 0 or setting >= tokens else setting
    if tokens * vocab * 4 <= KD_CHUNK_AUTO_OVER:
        return 0
    return max(1, KD_CHUNK_BYTES // (vocab * 4))


def _chunk_sum(h, w, b, t_h, t_w, t_b, idx, p_buckets, *, operator: Operator, loss_fn: LossFn) -> torch.Tensor:
    """Σ over one chunk's positions of the per-position loss (the body of :func:`chunked_kd_loss`)."""
    if p_buckets is not None:
        return loss_fn(p_buckets, student_buckets(F.linear(h, w, b), idx)).sum()
    logq = log_softmax_torch(F.linear(h, w, b).float())
    with torch.no_grad():
        logp = log_softmax_torch(F.linear(t_h, t_w, t_b).float())
    P, Q = operator.pair(logp, logq)
    return loss_fn(P, Q).sum()


def chunked_kd_loss(hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None], operator: Operator,
                    loss_fn: LossFn, chunk: int, *, teacher_hidden: torch.Tensor | None = None,
                    teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                    buckets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`kd_loss` (or :func:`bucket_kd_loss` with ``buckets=(idx, P_b)``) from the student's final hidden states
    [..., H] and output head (weight [V, H], bias), ``chunk`` tokens at a time; the teacher is either its final hidden
    states and head (logits access) or its top-K buckets. Same value and gradients as the unchunked loss, up to float
    rounding of the sum."""
    from torch.utils.checkpoint import checkpoint

    h = hidden.reshape(-1, hidden.shape[-1])
    n = h.shape[0]
    t_h = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    t_w, t_b = teacher_head if teacher_head is not None else (None, None)
    idx = p_b = None
    if buckets is not None:
        idx, p_b = buckets[0].reshape(n, -1), buckets[1].reshape(n, -1)
    elif t_h is None or teacher_head is None:
        raise ValueError("chunked_kd_loss needs the teacher's hidden states and head, or its buckets")
    body = functools.partial(_chunk_sum, operator=operator, loss_fn=loss_fn)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, n, max(1, chunk)):
        e = min(n, s + chunk)
        part = (h[s:e], head[0], head[1], None if t_h is None else t_h[s:e], t_w, t_b,
                None if idx is None else idx[s:e], None if p_b is None else p_b[s:e])
        total = total + checkpoint(body, *part, use_reentrant=False)
    scale = 1.0 if buckets is not None else operator.loss_scale
    return scale * total / n
