"""The teacher's side of the stability measurements, recorded at build time into the bundle's references (the
device has no teacher, and the prompt edits need the tokenizer). The teacher runs through the same ``Target`` code as
the student will on the device (``TorchTarget.from_model``): the same per-row seeds draw its samples, so teacher and
student are compared with common random numbers.

Tensors: ``stability_prompts`` [P, prefix]; ``teacher_samples`` / ``teacher_sample_entropy`` [P·N, L] (N =
``stability_samples`` per prompt, sample j of prompt p seeded p·N + j — ``core.stability.stability_seeds`` —, N
consecutive rows per prompt); with a tokenizer, ``sensitivity_ids`` [P·(1+E), Lmax] / ``sensitivity_len`` (0 = edit
not applicable), ``teacher_sensitivity_{kl,tv,flip}`` [P, E], and the teacher's next-token top-k buckets on every
edited row, ``teacher_sensitivity_topk_idx`` [P·(1+E), K] / ``teacher_sensitivity_buckets`` [P·(1+E), K+1] (its top-k
log-probs + tail, as ``topk_logp``/``tail_logp``: the student's extra divergence from the teacher on edited prompts).
Meta: ``stability_samples``, ``stability_seeding`` (``core.stability.SEEDING``; absent: the old seeds 0..N-1 for every
prompt), ``sensitivity_edits`` or ``sensitivity_skipped`` (why), ``low_confidence_threshold``, and
``teacher_stability`` — the teacher's statistics with their intervals (jitter at the default and the full sample
count, sensitivity, low-confidence share).
"""

from __future__ import annotations

import numpy as np

from ..core import consistency
from ..core import stability as S
from ..core.edits import EDITS, edited_prompts
from ..numerics import bucket, log_softmax

NO_TOKENIZER = ("the bundle has no tokenizer (a data-free run from a teacher without tokenizer files): the prompt "
                "edits are made on text; build with --tokenizer DIR to measure sensitivity")


def record_stability(teacher, heldout, s, tokenizer, teacher_top1_logp: np.ndarray) -> tuple[dict, dict]:
    """(tensors, meta) of the teacher's stability references. ``s``: the ``RefSettings``; ``teacher_top1_logp``
    [P, L]: the teacher's top-1 log-prob on the reference prompts (its low-confidence share)."""
    from ..targets.torch_cuda import TorchTarget

    target = TorchTarget.from_model(teacher)
    prompts = heldout[: s.stability_prompts, : s.prefix].numpy().astype(np.int64)
    n = s.stability_samples
    gen = target.sample_repeated(prompts, n, s.sample_tokens, s.temperature,
                                 seeds=S.stability_seeds(len(prompts), n, n))
    tensors = {"stability_prompts": prompts, "teacher_samples": gen.tokens,
               "teacher_sample_entropy": gen.entropies.astype(np.float32)}
    jitter = {}
    for k in sorted({min(s.samples, n), n}):
        cut = lambda x, k=k: x.reshape(len(prompts), n, -1)[:, :k].reshape(len(prompts) * k, -1)  # noqa: E731
        jitter[str(k)] = S.intervals(consistency.per_prompt(cut(gen.tokens), cut(gen.entropies), k, s.m))
    low = S.low_confidence_per_prompt(np.exp(teacher_top1_logp))
    meta = {"stability_samples": n, "stability_seeding": S.SEEDING, "low_confidence_threshold": S.LOW_CONFIDENCE,
            "teacher_stability": {"temperature": s.temperature, "m": s.m, "jitter": jitter,
                                  "low_confidence": S.interval(low),
                                  "mean_top1_prob": S.interval(np.exp(teacher_top1_logp).mean(-1))}}
    short = str(min(s.samples, n))
    meta["teacher_consistency"] = {key: v["value"] for key, v in jitter[short].items() if not key.startswith("jitter")}
    if tokenizer is None:
        meta["sensitivity_skipped"] = NO_TOKENIZER
        return tensors, meta
    rows = edited_prompts(tokenizer, prompts, target.vocab_size)
    logits = target.logits(rows.ids)
    last = logits[np.arange(len(logits)), np.maximum(rows.lengths, 1) - 1]
    logp = log_softmax(last)
    cells = S.sensitivity_cells(logp, rows.lengths, rows.per_prompt)
    summary = S.sensitivity_summary(cells, None, EDITS)
    if "skipped" in summary:
        meta["sensitivity_skipped"] = f"{summary['skipped']} (the tokenizer's re-encoding left no applicable edit)"
        return tensors, meta
    top = np.argsort(-logp, axis=-1, kind="stable")[:, : min(s.top_k, logp.shape[-1])].astype(np.int64)
    tensors.update({"sensitivity_ids": rows.ids, "sensitivity_len": rows.lengths,
                    **{f"teacher_sensitivity_{k}": v for k, v in cells.items()},
                    "teacher_sensitivity_topk_idx": top,
                    "teacher_sensitivity_buckets": bucket(logp, top).astype(np.float32)})
    meta["sensitivity_edits"] = list(EDITS)
    for block in (summary, summary.get("control") or {}):  # measured on the teacher (no student at build time)
        if "student" in block:
            block["teacher"] = block.pop("student")
    meta["teacher_stability"]["sensitivity"] = summary
    return tensors, meta
