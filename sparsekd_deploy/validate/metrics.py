"""Validation metrics, computed from a target runtime's outputs against stored teacher references.

NumPy only (no torch): this runs on the device, on the outputs of ONNX Runtime or TensorRT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..numerics import bucket_kl, log_softmax
from . import stability

if TYPE_CHECKING:
    from .references import References


def distribution_metrics(logits: np.ndarray, ref: References) -> dict:
    """kl_topk (KL over the teacher's top-k buckets + tail: a lower bound of the full KL), top-1, ppl ratio."""
    t = ref.tensors
    logq = log_softmax(logits)
    P = np.concatenate([t["topk_logp"], t["tail_logp"][..., None]], -1).astype(np.float64)
    kl_pos = bucket_kl(P, logq, t["topk_idx"])  # [prompts, positions]
    ids = t["input_ids"]
    nll = -np.take_along_axis(logq[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return {
        "kl_topk": float(kl_pos.mean()),
        "kl_topk_per_prompt": kl_pos.mean(-1).tolist(),
        "top1_agreement": float((logq.argmax(-1) == t["topk_idx"][..., 0]).mean()),
        "ppl": float(np.exp(nll.mean())),
        "ppl_ratio": float(np.exp(nll.mean() - t["nll"].mean())),
    }


def run_all(target, ref: References, logits: np.ndarray | None = None, samples: int | None = None) -> dict:
    """Every validation metric of ``target`` against the references: the distribution metrics above (kl_topk,
    top1_agreement, ppl, ppl_ratio), greedy match, repeat-prompt consistency at ``samples`` per prompt (default: the
    references' count) and the other stability measurements (``stability.py``: jitter, sensitivity, confidence,
    with intervals, and their student / teacher ratios) and determinism. ``logits``: the target's logits on the
    reference prompts, if already run."""
    t, meta = ref.tensors, ref.meta
    logits = target.logits(t["input_ids"]) if logits is None else logits
    out = distribution_metrics(logits, ref)
    prefix = t["input_ids"][:, : meta["prefix"]]
    greedy = target.generate(prefix, meta["greedy_tokens"]).tokens
    out["greedy_match"] = float((greedy == t["greedy"]).all(-1).mean())
    out["greedy_token_agreement"] = float((greedy == t["greedy"]).mean())
    out["consistency"], out["stability"], repeatable = stability.measure(target, ref, logits, samples)
    out.update(stability.ratios(out["stability"]))
    student, teacher = out["consistency"]["student"], out["consistency"]["teacher"]
    # Steadiness relative to the teacher: teacher entropy / student entropy (≥ 1: the student jitters no more).
    out["consistency_ratio"] = float(teacher["mean_entropy"] / max(student["mean_entropy"], 1e-9))
    greedy_again = target.generate(prefix, meta["greedy_tokens"]).tokens
    out["deterministic"] = bool(repeatable and np.array_equal(greedy_again, greedy))
    return out
