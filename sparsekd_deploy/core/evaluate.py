"""Held-out measurement of a student against its teacher: full-vocabulary KL(teacher‖student) and top-1 agreement."""

from __future__ import annotations

import torch

from ..numerics import kl_torch, log_softmax_torch


@torch.no_grad()
def heldout_metrics(teacher, student, heldout: torch.Tensor, batch_size: int, device) -> dict[str, float]:
    teacher.eval()
    student.eval()
    kl_sum = agree = count = 0.0
    for ids in heldout.split(batch_size):
        ids = ids.to(device)
        logp = log_softmax_torch(teacher(input_ids=ids).logits.float())
        logq = log_softmax_torch(student(input_ids=ids).logits.float())
        kl_sum += kl_torch(logp, logq).sum().item()
        agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
        count += ids.numel()
    return {"kl": kl_sum / count, "top1": agree / count}
