"""The three stability measurements, as statistics with bootstrap intervals: repeat-prompt jitter, sensitivity to
meaning-preserving prompt edits (``edits.py``) and low confidence / calibration. NumPy only at import (the
device-side validation uses it); the PyTorch helper imports torch inside.

Intervals: percentile bootstrap, 95 %, 2000 resamples, seed 0 (``numerics.bootstrap_interval``). **The resampled unit
is the prompt** (a cluster bootstrap): the N samples of one prompt, its edited variants and its positions all share
that prompt and are not independent draws of what a deployment sees — prompts are. Each per-prompt statistic already
averages over its N samples, so its spread across prompts contains the sampling noise too; resampling the samples
inside each prompt as well (a two-stage bootstrap) would count that noise twice and widen the interval for nothing.
Teacher and student are measured on the same prompts, so their ratio is bootstrapped *paired* (the same resamples).
With 16 prompts a percentile interval is somewhat too narrow (small-sample bias); it is a yardstick, not a test.

A stability number only means something beside KL: a collapsed model (one token, always) is perfectly steady, so
the gates over these ratios count only together with the KL gate (``validate/gate.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..numerics import bootstrap_interval, calibration_error, kl, total_variation

if TYPE_CHECKING:
    from .edits import EditedPrompts

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
# Top-1 probability below this counts as a low-confidence position. 0.3 (the suggestion): a model that puts
# < 30 % on its best guess is choosing among several continuations. The small benchmark teachers are that unsure at
# most positions of their references (demo 64-80 %, wide 86 %: data-free references are their own τ = 1 samples), so
# the share has more room to fall than to rise; a fixed threshold keeps it comparable across bundles and stages.
LOW_CONFIDENCE = 0.3
ECE_BINS = 10  # equal-width bins on [0, 1]


def ratio(a: float, b: float) -> float:
    """a / b for non-negative rates; 1 when both are 0 and a large finite number when only b is (JSON has no inf)."""
    if b > 0:
        return a / b
    return 1.0 if a == 0 else 1e9


def _mean(values: np.ndarray, idx: np.ndarray | None = None) -> float:
    v = values if idx is None else values[idx]
    return float(v.mean()) if v.size else float("nan")


def interval(per_unit, seed: int = SEED) -> dict:
    """{"value", "low", "high"}: the mean over units and its bootstrap interval (units = prompts)."""
    v = np.asarray(per_unit, dtype=np.float64)
    lo, hi = bootstrap_interval(lambda i: _mean(v, i), len(v), RESAMPLES, seed, LEVEL)
    return {"value": _mean(v), "low": lo, "high": hi}


def ratio_interval(student, teacher, seed: int = SEED) -> dict:
    """Ratio of means student / teacher with a paired bootstrap interval (the same prompts resampled for both)."""
    s, t = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    lo, hi = bootstrap_interval(lambda i: ratio(_mean(s, i), _mean(t, i)), len(s), RESAMPLES, seed, LEVEL)
    return {"value": ratio(_mean(s), _mean(t)), "low": lo, "high": hi}


def intervals(per_prompt: dict) -> dict:
    return {k: interval(v) for k, v in per_prompt.items()}


# -- sensitivity to prompt edits -----------------------------------------------------------------------------
def sensitivity_cells(logp_rows: np.ndarray, lengths: np.ndarray, per_prompt: int) -> dict[str, np.ndarray]:
    """From the next-token log-probs of every edited prompt row [P·(1+E), V] (row 0 of each prompt = its baseline):
    {"kl": KL(baseline‖edited), "tv": total variation, "flip": top-1 changed} as [P, E] arrays, NaN where the edit
    (or the baseline) was not applicable."""
    lp = np.asarray(logp_rows, dtype=np.float64).reshape(-1, per_prompt, logp_rows.shape[-1])
    ok = np.asarray(lengths).reshape(-1, per_prompt) > 0
    valid = ok[:, :1] & ok[:, 1:]
    base, edited = lp[:, :1], lp[:, 1:]
    cells = {"kl": kl(base, edited), "tv": total_variation(np.exp(base), np.exp(edited)),
             "flip": (base.argmax(-1) != edited.argmax(-1)).astype(np.float64)}
    return {k: np.where(valid, v, np.nan) for k, v in cells.items()}


def sensitivity_summary(student: dict, teacher: dict | None, edits) -> dict:
    """Per measure: student (and teacher) mean over applicable (prompt, edit) cells with intervals over prompts, the
    paired student / teacher ratio, and the mean per edit. Prompts with no applicable edit are left out."""
    keep = ~np.all(np.isnan(student["kl"]), axis=1)
    out: dict = {"prompts": int(keep.sum()), "edits": list(edits),
                 "applicable": int((~np.isnan(student["kl"])).sum())}
    if not keep.any():
        return {**out, "skipped": "no edit applied to any prompt"}
    for side, cells in (("student", student), ("teacher", teacher)):
        if cells is None:
            continue
        per_prompt = {k: np.nanmean(v[keep], axis=1) for k, v in cells.items()}
        out[side] = intervals(per_prompt)
        out[side]["per_edit"] = {k: {e: float(np.nanmean(v[:, j])) if np.any(~np.isnan(v[:, j])) else None
                                     for j, e in enumerate(edits)} for k, v in cells.items()}
    if teacher is not None:
        s, t = np.nanmean(student["kl"][keep], axis=1), np.nanmean(teacher["kl"][keep], axis=1)
        out["ratio"] = ratio_interval(s, t)  # on KL: student / teacher (≤ 1: the student moves no more)
    return out


# -- low confidence and calibration --------------------------------------------------------------------------
def low_confidence_per_prompt(top1_prob: np.ndarray, threshold: float = LOW_CONFIDENCE) -> np.ndarray:
    """[P, L] top-1 probabilities → share of each prompt's positions below ``threshold``."""
    return (np.asarray(top1_prob) < threshold).mean(-1).astype(np.float64)


def confidence_summary(student_logp: np.ndarray, teacher_top1_logp: np.ndarray, teacher_top1: np.ndarray,
                       threshold: float = LOW_CONFIDENCE, bins: int = ECE_BINS) -> dict:
    """Low-confidence share (student, teacher, paired ratio) and the ECE of the student's top-1 against the
    teacher's greedy token, on the reference prompts' positions ([P, L, V] student log-probs; the teacher's top-1
    log-prob and token [P, L])."""
    s_conf = np.exp(student_logp.max(-1))
    correct = student_logp.argmax(-1) == teacher_top1
    s_low = low_confidence_per_prompt(s_conf, threshold)
    t_low = low_confidence_per_prompt(np.exp(teacher_top1_logp), threshold)
    ece = lambda idx: calibration_error(s_conf[idx], correct[idx], bins)  # noqa: E731 - pooled positions of a resample
    lo, hi = bootstrap_interval(ece, len(s_conf), RESAMPLES, SEED, LEVEL)
    return {"threshold": threshold, "bins": bins, "positions": int(s_conf.size),
            "student": {"low_confidence": interval(s_low), "ece": {"value": ece(np.arange(len(s_conf))),
                                                                   "low": lo, "high": hi}},
            "teacher": {"low_confidence": interval(t_low)},
            "ratio": ratio_interval(s_low, t_low)}


# -- PyTorch side (distillation: cheap per-stage measurements) -----------------------------------------------
def next_token_logp_torch(model, rows: EditedPrompts, batch: int = 64) -> np.ndarray:
    """Next-token log-probs [R, V] (float64) after each right-padded row (``edits.EditedPrompts``) of a PyTorch LM."""
    import torch

    from ..numerics import log_softmax

    device = next(model.parameters()).device
    ids, lengths = torch.from_numpy(rows.ids), np.maximum(rows.lengths, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            logits = model(input_ids=ids[i : i + batch].to(device)).logits.float().cpu().numpy()
            out.append(logits[np.arange(len(logits)), lengths[i : i + batch] - 1])
    return log_softmax(np.concatenate(out))


class StageStability:
    """The ``stability`` entry of each accepted stage in the distill trajectory, kept cheap: the jitter comes from
    the consistency samples the stage draws anyway, low confidence and ECE from the held-out measurement of the kept
    state (the same forward passes as its KL: ``evaluate.heldout_metrics``), the sensitivity from one forward pass over
    the consistency prompts' edited rows (P × 6 short rows; the teacher's once per run). No intervals here:
    ``validate`` gives those on the target runtime."""

    def __init__(self, teacher, prompts, tokenizer):
        from .edits import edited_prompts

        self.rows = self.teacher_cells = None
        self.skipped = "no tokenizer: the prompt edits are made on text" if tokenizer is None else None
        if tokenizer is not None:
            rows = edited_prompts(tokenizer, prompts.cpu().numpy(), teacher.config.vocab_size)
            if (rows.lengths.reshape(-1, rows.per_prompt)[:, 1:] > 0).any():
                self.rows = rows
                self.teacher_cells = sensitivity_cells(next_token_logp_torch(teacher, rows), rows.lengths,
                                                       rows.per_prompt)
            else:
                self.skipped = "no edit applied to any consistency prompt"

    def entry(self, model, confidence: dict, consistency_rec: dict) -> dict:
        """``confidence``: the kept state's held-out low_confidence / teacher_low_confidence / ece;
        ``consistency_rec``: the stage's {"student": {τ: stats}, "teacher": {τ: stats}}."""
        jitter = {}
        for tau, s in consistency_rec["student"].items():
            key = next(k for k in s if k.startswith("pairwise_agreement@"))
            js, jt = 1.0 - s[key], 1.0 - consistency_rec["teacher"][tau][key]
            jitter[tau] = {"student": js, "teacher": jt, "ratio": ratio(js, jt), "m": int(key.split("@")[1])}
        out = {"jitter": jitter}
        if confidence.get("low_confidence") is not None:
            out["low_confidence"] = {"student": confidence["low_confidence"],
                                     "teacher": confidence["teacher_low_confidence"], "threshold": LOW_CONFIDENCE,
                                     "ratio": ratio(confidence["low_confidence"], confidence["teacher_low_confidence"]),
                                     "ece": confidence["ece"]}
        if self.rows is None:
            out["sensitivity"] = {"skipped": self.skipped}
            return out
        cells = sensitivity_cells(next_token_logp_torch(model, self.rows), self.rows.lengths, self.rows.per_prompt)
        s_kl, t_kl = float(np.nanmean(cells["kl"])), float(np.nanmean(self.teacher_cells["kl"]))
        out["sensitivity"] = {"student_kl": s_kl, "teacher_kl": t_kl, "ratio": ratio(s_kl, t_kl),
                              "student_flip": float(np.nanmean(cells["flip"])),
                              "teacher_flip": float(np.nanmean(self.teacher_cells["flip"]))}
        return out
