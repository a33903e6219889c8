"""Validation metrics, computed from a target runtime's outputs against stored teacher references.

NumPy only (no torch): this runs on the device, on the outputs of ONNX Runtime or TensorRT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..core import consistency
from ..numerics import bucket_kl, log_softmax

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


def run_all(target, ref: References, logits: np.ndarray | None = None) -> dict:
    """Every validation metric of ``target`` against the references: the distribution metrics above (kl_topk,
    top1_agreement, ppl, ppl_ratio), greedy match, repeat-prompt consistency (student and teacher) and
    determinism. ``logits``: the target's logits on the reference prompts, if already run."""
    t, meta = ref.tensors, ref.meta
    out = distribution_metrics(target.logits(t["input_ids"]) if logits is None else logits, ref)
    prefix = t["input_ids"][:, : meta["prefix"]]
    greedy = target.generate(prefix, meta["greedy_tokens"]).tokens
    out["greedy_match"] = float((greedy == t["greedy"]).all(-1).mean())
    out["greedy_token_agreement"] = float((greedy == t["greedy"]).mean())
    n = meta["samples"]
    rows = np.repeat(prefix, n, axis=0)
    seeds = [s for _ in range(len(prefix)) for s in meta["seeds"]]
    gen = target.generate(rows, meta["sample_tokens"], temperature=meta["temperature"], seeds=seeds)
    student = consistency.summarize(gen.tokens, gen.entropies, n, meta["m"])
    teacher = meta["teacher_consistency"]
    out["consistency"] = {"temperature": meta["temperature"], "student": student, "teacher": teacher}
    # Steadiness relative to the teacher: teacher entropy / student entropy (≥ 1: the student jitters no more).
    out["consistency_ratio"] = float(teacher["mean_entropy"] / max(student["mean_entropy"], 1e-9))
    again = target.generate(rows[:n], meta["sample_tokens"], temperature=meta["temperature"], seeds=seeds[:n])
    greedy_again = target.generate(prefix, meta["greedy_tokens"]).tokens
    out["deterministic"] = bool(np.array_equal(again.tokens, gen.tokens[:n]) and np.array_equal(greedy_again, greedy))
    return out
