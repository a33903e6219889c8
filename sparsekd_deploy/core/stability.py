"""The three stability measurements, as statistics with bootstrap intervals: repeat-prompt jitter, sensitivity to
meaning-preserving prompt edits (``edits.py``) and low confidence / calibration. NumPy only at import (the
device-side validation uses it); the PyTorch helper imports torch inside.

Intervals: BCa bootstrap (bias-corrected and accelerated, the acceleration from the jackknife over prompts), 95 %,
2000 resamples, seed 0 (``numerics.bootstrap``). **The resampled unit is the prompt** (a cluster bootstrap): the N
samples of one prompt, its edited variants and its positions all share that prompt and are not independent draws of
what a deployment sees — prompts are. Each per-prompt statistic already averages over its N samples, so its spread
across prompts contains the sampling noise too; resampling the samples inside each prompt as well (a two-stage
bootstrap) would count that noise twice. Teacher and student are measured on the same prompts, so their ratio is
bootstrapped *paired* (the same resamples). With 16 prompts a percentile interval under-covers (a simulation of these
ratios: 82-87 % for a nominal 95 %); BCa corrects its bias and skew to second order, but 16 units remain few: read the
intervals as a yardstick, not as a test.

Ratios: a resample whose teacher mean is ≤ ``EPS`` has no ratio; it is dropped and counted (``dropped_resamples``).
Where the teacher's own mean is ≤ ``EPS``, or more than ``MAX_DROPPED`` of the resamples were dropped, the ratio is
null (``value``/``low``/``high`` None) with a ``why``. No interval ever holds NaN or a placeholder.

Seeds: sample j of prompt p draws from seed p·N_ref + j (``stability_seeds``), the teacher at build time and the
student on the device alike: paired across models, and no two prompts share a random stream (with seed j for every
prompt the prompts' samples were correlated, and the bootstrap treats prompts as independent).

A stability number only means something beside KL: a collapsed model (one token, always) is perfectly steady, so
the gates over these ratios count only together with the KL gate (``validate/gate.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..numerics import bootstrap, bucket_kl, calibration_error, kl, total_variation
from .edits import CONTROL_EDITS

if TYPE_CHECKING:
    from .edits import EditedPrompts

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
METHOD = "bca"
EPS = 1e-12  # a teacher mean at or below this is no denominator
MAX_DROPPED = 0.05  # more resamples than this share without a ratio: the ratio's interval is not given
# Top-1 probability below this counts as a low-confidence position. 0.3 (the suggestion): a model that puts
# < 30 % on its best guess is choosing among several continuations. The small benchmark teachers are that unsure at
# most positions of their references (demo 64-80 %, wide 86 %: data-free references are their own τ = 1 samples), so
# the share has more room to fall than to rise; a fixed threshold keeps it comparable across bundles and stages.
LOW_CONFIDENCE = 0.3
ECE_BINS = 10  # equal-width bins on [0, 1]
# How the stability samples are seeded (recorded in the references' meta as ``stability_seeding``).
SEEDING = "prompt*stability_samples+sample"


def stability_seeds(prompts: int, n: int, n_ref: int) -> list[list[int]]:
    """[P][n] sample seeds: sample j of prompt p draws from p·n_ref + j while j < n_ref (the teacher's references hold
    n_ref per prompt, drawn with these seeds: the pairing holds); samples beyond n_ref (a student asked for more)
    continue after the last prompt's block, so no seed repeats across prompts."""
    return [[p * n_ref + j if j < n_ref else prompts * n_ref + p * (n - n_ref) + (j - n_ref) for j in range(n)]
            for p in range(prompts)]


def ratio(a: float, b: float) -> float | None:
    """a / b for non-negative rates; None (JSON null) when b ≤ ``EPS``: there is no ratio to a zero teacher."""
    return a / b if b > EPS else None


def _null(why: str) -> dict:
    return {"value": None, "low": None, "high": None, "why": why}


def interval(per_unit, seed: int = SEED) -> dict:
    """{"value", "low", "high"}: the mean over units and its BCa interval (units = prompts; non-finite units left
    out, none left: all None)."""
    v = np.asarray(per_unit, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"value": None, "low": None, "high": None}
    b = bootstrap(lambda i: float(v[i].mean()), len(v), RESAMPLES, seed, LEVEL, METHOD)
    return {"value": float(v.mean()), "low": b.low, "high": b.high}


def paired_interval(statistic, n_units: int, seed: int = SEED, method: str = METHOD) -> dict:
    """``statistic(idx)`` of ``n_units`` paired units (e.g. student ECE - teacher ECE over prompts' positions): its
    value on every unit and its interval (BCa unless ``method`` says otherwise; then the dict names it)."""
    b = bootstrap(statistic, n_units, RESAMPLES, seed, LEVEL, method)
    value = float(statistic(np.arange(n_units))) if n_units else float("nan")
    out = {"value": value if np.isfinite(value) else None, "low": b.low, "high": b.high}
    return out if method == METHOD else {**out, "method": method}


# The binned ECE is biased upward, and more so under resampling (noise in a bin's gap only adds to |accuracy -
# confidence|): on a small ECE the resampled values mostly lie above the plug-in value, so a percentile interval can
# miss it from above (seen: 0.018 [0.019, 0.056]) and BCa, which corrects that bias, can leave it just below (0.018
# [0.013, 0.017]). The ECE intervals are BCa like the rest; read them as rough.
ECE_METHOD = METHOD


def ratio_interval(student, teacher, seed: int = SEED) -> dict:
    """Ratio of means student / teacher with a paired BCa interval (the same prompts resampled for both; prompts
    where either side is not finite left out). Null with a ``why`` when the teacher's mean is ≤ ``EPS`` or more than
    ``MAX_DROPPED`` of the resamples had a teacher mean ≤ ``EPS``; fewer such resamples are dropped and counted."""
    s, t = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(t)
    s, t = s[ok], t[ok]
    if not s.size:
        return _null("no prompt where both sides were measured")
    tv = float(t.mean())
    if not tv > EPS:
        return _null(f"the teacher's mean is {tv:.3g} (student {float(s.mean()):.3g}): there is no ratio to a zero "
                     f"teacher")

    def stat(i):
        d = t[i].mean()
        return s[i].mean() / d if d > EPS else np.nan

    b = bootstrap(stat, len(s), RESAMPLES, seed, LEVEL, METHOD)
    if b.low is None or b.dropped > MAX_DROPPED * b.resamples:
        return _null(f"{b.dropped} of {b.resamples} resamples had a teacher mean ≤ {EPS:g} (more than "
                     f"{MAX_DROPPED:.0%}): the teacher is zero on too many prompts for an interval of the ratio")
    out = {"value": float(s.mean()) / tv, "low": b.low, "high": b.high}
    if b.dropped:
        out["dropped_resamples"] = b.dropped
    return out


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


def excess_kl_cells(teacher_buckets: np.ndarray, teacher_idx: np.ndarray, student_logp_rows: np.ndarray,
                    lengths: np.ndarray, per_prompt: int) -> dict[str, np.ndarray]:
    """The student's divergence from the teacher on every edited-prompt row, over the teacher's top-k buckets + tail
    (as ``kl_topk``): {"original": KL(T(x)‖S(x)) [P], "edited": KL(T(x′)‖S(x′)) [P, E], "excess": edited - original
    [P, E]} (NaN where not applicable). ``excess`` does not reward a flatter student: it is how much further the
    student strays from the teacher once the prompt is edited (0: it follows the teacher's own reaction)."""
    d = bucket_kl(np.asarray(teacher_buckets, dtype=np.float64), np.asarray(student_logp_rows, dtype=np.float64),
                  np.asarray(teacher_idx)).reshape(-1, per_prompt)
    ok = np.asarray(lengths).reshape(-1, per_prompt) > 0
    valid = ok[:, :1] & ok[:, 1:]
    return {"original": np.where(ok[:, 0], d[:, 0], np.nan), "edited": np.where(valid, d[:, 1:], np.nan),
            "excess": np.where(valid, d[:, 1:] - d[:, :1], np.nan)}


def _row_mean(v: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per prompt (rows ``keep``), the mean over its applicable cells."""
    return np.array([np.nanmean(r) for r in v[keep]], dtype=np.float64)


def _edit_block(student: dict, teacher: dict | None, cols: list[int]) -> dict:
    """Mean over the applicable (prompt, edit) cells of the edits ``cols``, intervals over prompts, ratio on KL."""
    sub = lambda cells: {k: v[:, cols] for k, v in cells.items()}  # noqa: E731
    s_cells = sub(student)
    keep = ~np.all(np.isnan(s_cells["kl"]), axis=1)
    out: dict = {"prompts": int(keep.sum()), "applicable": int((~np.isnan(s_cells["kl"])).sum())}
    if not keep.any():
        return {**out, "skipped": "no edit applied to any prompt"}
    for side, cells in (("student", s_cells), ("teacher", sub(teacher) if teacher is not None else None)):
        if cells is not None:
            out[side] = intervals({k: _row_mean(v, keep) for k, v in cells.items()})
    if teacher is not None:  # on KL: student / teacher (≤ 1: the student moves no more)
        out["ratio"] = ratio_interval(_row_mean(s_cells["kl"], keep), _row_mean(teacher["kl"][:, cols], keep))
    return out


def sensitivity_summary(student: dict, teacher: dict | None, edits, excess: dict | None = None) -> dict:
    """Per measure: student (and teacher) mean over the applicable (prompt, edit) cells of the headline edits (every
    edit but ``CONTROL_EDITS``) with intervals over prompts, the paired student / teacher KL ratio, the mean per
    edit, a paired ratio with its interval per edit (``per_edit_ratio``, the control included), the control edits
    on their own (``control``), and with ``excess`` (``excess_kl_cells``) the student's extra divergence from the
    teacher on edited prompts. Prompts with no applicable edit are left out."""
    edits = list(edits)
    head = [j for j, e in enumerate(edits) if e not in CONTROL_EDITS]
    ctrl = [j for j, e in enumerate(edits) if e in CONTROL_EDITS]
    out: dict = {"edits": [edits[j] for j in head], "control_edits": [edits[j] for j in ctrl],
                 **_edit_block(student, teacher, head)}
    if "skipped" in out:
        return out
    for side, cells in (("student", student), ("teacher", teacher)):
        if cells is not None:
            out[side]["per_edit"] = {k: {e: float(np.nanmean(v[:, j])) if np.any(~np.isnan(v[:, j])) else None
                                         for j, e in enumerate(edits)} for k, v in cells.items()}
    if teacher is not None:
        out["per_edit_ratio"] = {}
        for j, e in enumerate(edits):
            applied = ~np.isnan(student["kl"][:, j])
            r = ratio_interval(student["kl"][applied, j], teacher["kl"][applied, j]) if applied.any() \
                else _null("the edit applied to no prompt")
            out["per_edit_ratio"][e] = {**r, "prompts": int(applied.sum())}
    if ctrl:
        out["control"] = {"edits": [edits[j] for j in ctrl], **_edit_block(student, teacher, ctrl)}
    if excess is not None:
        keep = ~np.all(np.isnan(excess["excess"][:, head]), axis=1)
        out["excess_kl"] = interval(_row_mean(excess["excess"][:, head], keep))
        out["excess_kl_per_edit"] = {e: interval(excess["excess"][:, j]) for j, e in enumerate(edits)}
        out["kl_to_teacher_original"] = interval(excess["original"][keep])
        out["kl_to_teacher_edited"] = interval(_row_mean(excess["edited"][:, head], keep))
    return out


# -- low confidence and calibration --------------------------------------------------------------------------
def low_confidence_per_prompt(top1_prob: np.ndarray, threshold: float = LOW_CONFIDENCE) -> np.ndarray:
    """[P, L] top-1 probabilities → share of each prompt's positions below ``threshold``."""
    return (np.asarray(top1_prob) < threshold).mean(-1).astype(np.float64)


def confidence_summary(student_logp: np.ndarray, teacher_top1_logp: np.ndarray, teacher_top1: np.ndarray,
                       ids: np.ndarray | None = None, teacher_nll: np.ndarray | None = None,
                       threshold: float = LOW_CONFIDENCE, bins: int = ECE_BINS) -> dict:
    """On the reference prompts' positions ([P, L, V] student log-probs; the teacher's top-1 log-prob and token
    [P, L]; the reference text ``ids`` [P, L] and the teacher's NLL of each next token [P, L-1]):

    - ``low_confidence``: share of positions with top-1 p < ``threshold``, student and teacher, and their paired
      ratio (``ratio``: the gate's). A ratio < 1 is *not* better by itself: it may be overconfidence — read it with
      the calibration below;
    - ``mean_top1_prob``: the threshold-free mean top-1 probability, both sides, and ``mean_top1_prob_ratio``;
    - ``ece_next_token`` / ``nll_next_token``: calibration of each model's top-1 (10-bin ECE) and its NLL against
      the actual next token of the reference text, both models, and the paired ``*_difference`` student - teacher
      (> 0: the student is worse calibrated / less likely to predict the text);
    - ``ece_vs_teacher_greedy``: the student's top-1 confidence against whether it agrees with the teacher's top-1
      (an agreement calibration, not a calibration against the data).

    Every interval resamples prompts (a prompt's positions stay together); the ECE ones are rough (``ECE_METHOD``).
    """
    P = student_logp.shape[0]
    s_conf, s_top = np.exp(student_logp.max(-1)), student_logp.argmax(-1)
    t_conf = np.exp(np.asarray(teacher_top1_logp, dtype=np.float64))
    s_low, t_low = low_confidence_per_prompt(s_conf, threshold), low_confidence_per_prompt(t_conf, threshold)
    agree = s_top == teacher_top1
    student = {"low_confidence": interval(s_low), "mean_top1_prob": interval(s_conf.mean(-1)),
               "ece_vs_teacher_greedy": paired_interval(
                   lambda i: calibration_error(s_conf[i], agree[i], bins), P, method=ECE_METHOD)}
    teacher = {"low_confidence": interval(t_low), "mean_top1_prob": interval(t_conf.mean(-1))}
    out = {"threshold": threshold, "bins": bins, "prompts": int(P), "positions": int(s_conf.size),
           "student": student, "teacher": teacher, "ratio": ratio_interval(s_low, t_low),
           "mean_top1_prob_ratio": ratio_interval(s_conf.mean(-1), t_conf.mean(-1))}
    if ids is not None and teacher_nll is not None:
        nxt = np.asarray(ids)[:, 1:]
        s_ok, t_ok = s_top[:, :-1] == nxt, np.asarray(teacher_top1)[:, :-1] == nxt
        sc, tc = s_conf[:, :-1], t_conf[:, :-1]
        ece_s = lambda i: calibration_error(sc[i], s_ok[i], bins)  # noqa: E731 - pooled positions of the prompts i
        ece_t = lambda i: calibration_error(tc[i], t_ok[i], bins)  # noqa: E731
        s_nll = -np.take_along_axis(student_logp[:, :-1], nxt[..., None], -1)[..., 0].mean(-1)
        t_nll = np.asarray(teacher_nll, dtype=np.float64).mean(-1)
        student.update(ece_next_token=paired_interval(ece_s, P, method=ECE_METHOD), nll_next_token=interval(s_nll))
        teacher.update(ece_next_token=paired_interval(ece_t, P, method=ECE_METHOD), nll_next_token=interval(t_nll))
        out["ece_next_token_difference"] = paired_interval(lambda i: ece_s(i) - ece_t(i), P, method=ECE_METHOD)
        out["nll_next_token_difference"] = interval(s_nll - t_nll)
    return out


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
        """``confidence``: the kept state's held-out low_confidence / teacher_low_confidence / ece (vs the teacher's
        top-1, recorded as ``ece_vs_teacher_greedy``);
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
                                     # the student's top-1 confidence vs agreeing with the teacher's top-1
                                     "ece_vs_teacher_greedy": confidence["ece"]}
        if self.rows is None:
            out["sensitivity"] = {"skipped": self.skipped}
            return out
        cells = sensitivity_cells(next_token_logp_torch(model, self.rows), self.rows.lengths, self.rows.per_prompt)
        head = [j for j, e in enumerate(self.rows.edits) if e not in CONTROL_EDITS]
        ctrl = [j for j, e in enumerate(self.rows.edits) if e in CONTROL_EDITS]

        def mean(v, cols):
            v = v[:, cols]
            return float(np.nanmean(v)) if np.any(~np.isnan(v)) else None

        s_kl, t_kl = mean(cells["kl"], head), mean(self.teacher_cells["kl"], head)
        out["sensitivity"] = {"edits": [self.rows.edits[j] for j in head], "student_kl": s_kl, "teacher_kl": t_kl,
                              "ratio": ratio(s_kl, t_kl) if s_kl is not None and t_kl is not None else None,
                              "student_flip": mean(cells["flip"], head),
                              "teacher_flip": mean(self.teacher_cells["flip"], head)}
        if ctrl:  # the control edit (a final '.'), kept out of the headline numbers
            out["sensitivity"]["control"] = {"edits": [self.rows.edits[j] for j in ctrl],
                                             "student_kl": mean(cells["kl"], ctrl),
                                             "teacher_kl": mean(self.teacher_cells["kl"], ctrl)}
        return out
