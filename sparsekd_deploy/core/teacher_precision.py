"""The teacher's weights while the student trains (``--teacher-precision``).

The teacher is never trained, so it needs no fp32 master weights: held in 16 bits it takes half the memory (a 1 B
teacher: 2 GB instead of 4 GB on every rank, DDP and FSDP alike, since it is never sharded). Under a 16-bit autocast
its matmuls already run in that type, so ``auto`` keeps the numbers of those matmuls and changes only the rest
(norms, embeddings, the softmax inputs, which the losses read as float32). Everything measured before training —
the data set sampled from the teacher, its consistency and stability baselines, the load-path analysis — uses the
fp32 teacher, and a restore to stage 0 reads its fp32 weights from disk.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_dtype(setting: str, device: torch.device, mixed_precision: str) -> torch.dtype:
    """The dtype ``setting`` (auto | fp32 | bf16 | fp16) asks for on ``device`` under Accelerate's ``mixed_precision``
    (no | bf16 | fp16). auto: the autocast type on a GPU, fp32 elsewhere (a CPU run has no autocast)."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda" and mixed_precision in ("bf16", "fp16"):
        return DTYPES[mixed_precision]
    return torch.float32


def name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)
