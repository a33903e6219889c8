"""Held-out measurement of a student against its teacher: full-vocabulary KL(teacher‖student) and top-1 agreement,
and from the same forward passes (no extra cost) the stability side of confidence: the share of positions whose top-1
probability is below ``stability.LOW_CONFIDENCE`` (student and teacher) and the ECE of the student's top-1 against
the teacher's.

With a teacher top-K cache (``--teacher-access topk:K``) the teacher is not in memory: its held-out buckets come from
the cache, the KL is over its K+1 buckets (the top K and the tail: a lower bound of the full KL, the quantity
validation reports as ``kl_topk``), and its top-1 is the first cached outcome."""

from __future__ import annotations

import torch

from ..numerics import bucket_kl_torch, kl_torch, log_softmax_torch
from .stability import ECE_BINS, LOW_CONFIDENCE


@torch.no_grad()
def heldout_metrics(teacher, student, heldout: torch.Tensor, batch_size: int, device, cached=None) -> dict[str, float]:
    """``cached``: the held-out split of a teacher top-K cache (``topk_cache.CacheSplit``), used instead of ``teacher``."""
    if cached is None:
        teacher.eval()
    student.eval()
    kl_sum = agree = count = low_s = low_t = 0.0
    gap = torch.zeros(ECE_BINS, dtype=torch.float64)  # per confidence bin: Σ correct - Σ confidence
    for i, ids in enumerate(heldout.split(batch_size)):
        ids = ids.to(device)
        if cached is None:
            logp = log_softmax_torch(teacher(input_ids=ids).logits.float())
        logq = log_softmax_torch(student(input_ids=ids).logits.float())
        if cached is None:
            kl_sum += kl_torch(logp, logq).sum().item()
            t_top, t_idx = logp.max(-1)
        else:
            idx, p_b = cached.targets(torch.arange(i * batch_size, i * batch_size + len(ids)))
            idx, p_b = idx.to(device), p_b.to(device)
            kl_sum += bucket_kl_torch(p_b, logq, idx).sum().item()
            t_top, t_idx = p_b[..., 0], idx[..., 0]
        s_top, s_idx = logq.max(-1)
        correct = (t_idx == s_idx).double().flatten().cpu()
        agree += correct.sum().item()
        count += ids.numel()
        conf = s_top.exp().double().flatten().cpu()
        low_s += (conf < LOW_CONFIDENCE).sum().item()
        low_t += (t_top.exp() < LOW_CONFIDENCE).sum().item()
        # A diverged student's NaN confidences go to bin 0 (their NaN gap makes the ECE NaN): the KL is then NaN too,
        # which never wins a recovery (recovery.Recovery), instead of bincount failing on NaN's negative bin.
        bins = torch.nan_to_num(conf * ECE_BINS, nan=0.0).long().clamp(0, ECE_BINS - 1)
        gap += torch.bincount(bins, correct - conf, minlength=ECE_BINS)
    return {"kl": kl_sum / count, "top1": agree / count, "low_confidence": low_s / count,
            "teacher_low_confidence": low_t / count, "ece": gap.abs().sum().item() / count}
