"""Stability on the target runtime against the teacher's stored references (NumPy only: this runs on the device).

Three measurements, each with 95 % BCa bootstrap intervals over prompts (``core/stability.py`` says why the prompt is
the resampled unit), teacher and student on the same prompts, seeds and temperature; each records its ``prompts``:

- ``jitter``: repeat-prompt consistency at ``--samples N`` per prompt (``core/consistency.py``'s statistics plus
  ``jitter@m`` = 1 - pairwise_agreement@m); the teacher's side comes from its samples stored at build time (drawn
  with the same per-row seeds, p·N_ref + j, through the same ``Target`` code), cut to the same N. ``jitter_ratio`` =
  student / teacher jitter@m; ``agreement_ratio`` = student / teacher pairwise_agreement@m (jitter@m near 1 squeezes
  its ratio towards 1, the agreement ratio is the same comparison on the unsqueezed side).
- ``sensitivity``: next-token distribution of each prompt vs its meaning-preserving edits (``core/edits.py``), as
  KL(original‖edited), total variation and top-1 flip rate, over the headline edits (the trailing-'.' edit is a
  separate ``control``: it is not meaning-preserving for the next token), with a paired ratio per edit
  (``per_edit_ratio``) and, where the references hold the teacher's top-k on the edited rows, ``excess_kl``: the
  student's extra divergence from the teacher on edited prompts, KL(T(x′)‖S(x′)) - KL(T(x)‖S(x)), which a flatter
  student does not win. The edited rows and the teacher's values are recorded at build time (edits need the
  tokenizer, the device has no teacher). ``sensitivity_ratio`` = student / teacher KL over the headline edits.
- ``confidence``: share of positions whose top-1 probability is below ``LOW_CONFIDENCE`` (student and teacher), the
  mean top-1 probability, ECE and NLL of each model's top-1 against the reference text's actual next token, and the
  ECE of the student's top-1 against the teacher's greedy token. ``low_confidence_ratio`` = student / teacher (< 1
  can be overconfidence: read it with the calibration).

A ratio ≤ 1 means the student is at least as steady as its teacher. References recorded before a measurement existed
leave it out with one note naming the command that re-records them; the other metrics and the verdict stand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..core import consistency
from ..core import stability as S
from ..numerics import log_softmax

if TYPE_CHECKING:
    from .references import References

RERECORD = ("re-record the references with `sparsekd-deploy build ... --out BUNDLE --resume --overwrite` (the build's "
            "flags; it reuses the finished distillation run)")


def check(refs: References) -> None:
    """Stability references that are there must be whole and agree in shape (a damaged bundle is one clear error)."""
    from ..bundle import BundleError

    t, meta = refs.tensors, refs.meta
    problems = []
    if "teacher_samples" in t:
        n = meta.get("stability_samples")
        if not all(k in t for k in ("stability_prompts", "teacher_sample_entropy")) or not isinstance(n, int) \
                or n < 2 or t["teacher_samples"].shape != t["teacher_sample_entropy"].shape \
                or t["teacher_samples"].shape[0] != len(t["stability_prompts"]) * n:
            problems.append("teacher samples (teacher_samples, teacher_sample_entropy, stability_prompts, "
                            "stability_samples) disagree or are incomplete")
    if "sensitivity_ids" in t:
        edits = meta.get("sensitivity_edits")
        cells = [t.get(f"teacher_sensitivity_{k}") for k in ("kl", "tv", "flip")]
        top = [t.get(k) for k in ("teacher_sensitivity_topk_idx", "teacher_sensitivity_buckets")]
        if not isinstance(edits, list) or "sensitivity_len" not in t or any(c is None for c in cells) \
                or any(c.shape != cells[0].shape for c in cells) or cells[0].shape[1:] != (len(edits),) \
                or not len(t["sensitivity_ids"]) == len(t["sensitivity_len"]) == cells[0].shape[0] * (1 + len(edits)) \
                or (top[0] is None) != (top[1] is None) or (top[0] is not None and not (
                    top[0].ndim == top[1].ndim == 2 and len(top[0]) == len(top[1]) == len(t["sensitivity_ids"])
                    and top[1].shape[1] == top[0].shape[1] + 1)):
            problems.append("sensitivity references (sensitivity_ids, sensitivity_len, teacher_sensitivity_*, "
                            "sensitivity_edits) disagree or are incomplete")
    if problems:
        raise BundleError(f"bundle references: {'; '.join(problems)}; {RERECORD}")


def _cut(rows: np.ndarray, per_prompt: int, n: int) -> np.ndarray:
    """The first ``n`` of every prompt's ``per_prompt`` consecutive rows."""
    return rows.reshape(-1, per_prompt, *rows.shape[1:])[:, :n].reshape(-1, *rows.shape[1:])


def repeatable(target, prompts: np.ndarray, n: int, tokens: int, tau: float, seeds, first: np.ndarray) -> bool:
    """Determinism: the first prompt's first samples drawn again with the same seeds give the same tokens."""
    k = min(n, 16)
    return bool(np.array_equal(target.sample_repeated(prompts[:1], k, tokens, tau, seeds=list(seeds)[:k]).tokens,
                               first[:k]))


def jitter(target, refs: References, samples: int | None) -> tuple[dict, dict | None, list[str], bool]:
    """(the ``consistency`` block, the ``jitter`` block or None for references without stored teacher samples,
    notes, whether sampling was repeatable)."""
    t, meta = refs.tensors, refs.meta
    tau, m = meta["temperature"], meta["m"]
    notes: list[str] = []
    if "teacher_samples" not in t:  # references from before the stability references
        n = meta["samples"]
        if samples is not None and samples != n:
            notes.append(f"--samples {samples} ignored: this bundle's teacher consistency was recorded at {n} samples "
                         f"per prompt, and its references hold no teacher samples to compare at another count")
        prompts = t["input_ids"][:, : meta["prefix"]]
        gen = target.sample_repeated(prompts, n, meta["sample_tokens"], tau, seeds=meta["seeds"])
        student = consistency.summarize(gen.tokens, gen.entropies, n, m)
        again = repeatable(target, prompts, n, meta["sample_tokens"], tau, meta["seeds"], gen.tokens)
        return ({"temperature": tau, "samples": n, "student": student, "teacher": meta["teacher_consistency"]}, None,
                notes, again)
    prompts, n_ref = t["stability_prompts"], meta["stability_samples"]
    n = samples or meta["samples"]
    if meta.get("stability_seeding") == S.SEEDING:
        seeds = S.stability_seeds(len(prompts), n, n_ref)
    else:  # references recorded with seeds 0..N-1 for every prompt: the same here, or the pairing is lost
        seeds = [list(range(n))] * len(prompts)
        notes.append(f"this bundle's teacher samples share the seeds 0..N-1 across prompts (correlated prompts, "
                     f"intervals somewhat too narrow); {RERECORD} to draw sample j of prompt p with seed p·N + j")
    gen = target.sample_repeated(prompts, n, t["teacher_samples"].shape[1], tau, seeds=seeds)
    k = min(n, n_ref)  # the teacher's references hold n_ref samples per prompt: compare at k
    if k < n:
        notes.append(f"the teacher references hold {n_ref} samples per prompt: teacher vs student compared on the "
                     f"first {k} of the student's {n}")
    s_all = consistency.per_prompt(gen.tokens, gen.entropies, n, m)
    s_k = consistency.per_prompt(_cut(gen.tokens, n, k), _cut(gen.entropies, n, k), k, m) if k < n else s_all
    t_k = consistency.per_prompt(_cut(t["teacher_samples"], n_ref, k), _cut(t["teacher_sample_entropy"], n_ref, k),
                                 k, m)
    block = {"temperature": tau, "m": m, "samples": n, "prompts": len(prompts), "compared_at": k,
             "teacher_samples": n_ref, "chunks": gen.chunks, "rows_per_chunk": gen.rows_per_chunk,
             "student": S.intervals(s_all), "teacher": S.intervals(t_k),
             "ratio": S.ratio_interval(s_k[f"jitter@{m}"], t_k[f"jitter@{m}"]),
             "agreement_ratio": S.ratio_interval(s_k[f"pairwise_agreement@{m}"], t_k[f"pairwise_agreement@{m}"]),
             "entropy_ratio": S.ratio_interval(s_k["mean_entropy"], t_k["mean_entropy"])}
    if k < n:
        block["student_at_compared"] = S.intervals(s_k)
    point = lambda d: {key: float(np.mean(v)) for key, v in d.items() if not key.startswith("jitter")}  # noqa: E731
    legacy = {"temperature": tau, "samples": k, "prompts": len(prompts), "student": point(s_k), "teacher": point(t_k)}
    again = repeatable(target, prompts, n, gen.tokens.shape[1], tau, seeds[0], gen.tokens)
    return legacy, block, notes, again


def sensitivity(target, refs: References) -> dict | None:
    t, meta = refs.tensors, refs.meta
    if "sensitivity_ids" not in t:
        return {"skipped": meta["sensitivity_skipped"]} if "sensitivity_skipped" in meta else None
    lengths = t["sensitivity_len"]
    logits = target.logits(t["sensitivity_ids"])
    last = logits[np.arange(len(logits)), np.maximum(lengths, 1) - 1]
    edits = meta["sensitivity_edits"]
    logp = log_softmax(last)
    student = S.sensitivity_cells(logp, lengths, 1 + len(edits))
    teacher = {k: t[f"teacher_sensitivity_{k}"].astype(np.float64) for k in ("kl", "tv", "flip")}
    excess = None
    if "teacher_sensitivity_buckets" in t:
        excess = S.excess_kl_cells(t["teacher_sensitivity_buckets"], t["teacher_sensitivity_topk_idx"], logp, lengths,
                                   1 + len(edits))
    out = S.sensitivity_summary(student, teacher, edits, excess)
    if excess is None and "skipped" not in out:
        out["excess_kl_skipped"] = (f"the references hold no teacher top-k on the edited prompts (recorded before "
                                    f"it existed); {RERECORD}")
    return out


def confidence(logits: np.ndarray, refs: References) -> dict:
    t = refs.tensors
    return S.confidence_summary(log_softmax(logits), t["topk_logp"][..., 0], t["topk_idx"][..., 0],
                                ids=t["input_ids"], teacher_nll=t["nll"])


def measure(target, refs: References, logits: np.ndarray, samples: int | None = None) -> tuple[dict, dict, bool]:
    """(the ``consistency`` block, the ``stability`` block, whether seeded sampling repeated) of ``target``."""
    check(refs)
    legacy, jit, notes, again = jitter(target, refs, samples)
    sens = sensitivity(target, refs)
    missing = [name for name, block in (("jitter intervals", jit), ("sensitivity", sens)) if block is None]
    if missing:
        notes.insert(0, f"this bundle's references predate the stability references: {' and '.join(missing)} not "
                        f"measured; {RERECORD}")
    conf = confidence(logits, refs)
    for name, block in (("jitter", jit), ("sensitivity", sens), ("confidence", conf)):
        why = ((block or {}).get("ratio") or {}).get("why")
        if why:
            notes.append(f"{name} ratio not given: {why}")
    if sens and sens.get("excess_kl_skipped"):
        notes.append(f"sensitivity excess_kl not measured: {sens['excess_kl_skipped']}")
    stab = {"jitter": jit, "sensitivity": sens, "confidence": conf, "missing": missing,
            "notes": notes, "bootstrap": {"unit": "prompt", "method": "BCa", "resamples": S.RESAMPLES,
                                          "level": S.LEVEL, "seed": S.SEED}}
    return legacy, stab, again


def ratios(stab: dict) -> dict:
    """The three gate values (None where not measured): student / teacher jitter@m, sensitivity KL, low confidence."""
    sens = stab.get("sensitivity") or {}
    return {"jitter_ratio": stab["jitter"]["ratio"]["value"] if stab.get("jitter") else None,
            "sensitivity_ratio": sens["ratio"]["value"] if "ratio" in sens else None,
            "low_confidence_ratio": stab["confidence"]["ratio"]["value"]}


def _iv(d: dict | None, fmt: str = ".3f") -> str:
    if not d or d.get("value") is None:
        return "n/a" + (f" ({d['why']})" if d and d.get("why") else "")
    if d.get("low") is None or d.get("high") is None:
        return f"{d['value']:{fmt}} [no interval]"
    return f"{d['value']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def stability_lines(stab: dict) -> list[str]:
    """The stability block in a few plain lines (student / teacher, 95 % BCa intervals over prompts), then its
    notes."""
    lines = []
    j = stab.get("jitter")
    if j:
        m = j["m"]
        lines.append(f"jitter@{m} at τ={j['temperature']} ({j['samples']} samples × {j['prompts']} prompts, "
                     f"{j['chunks']} chunk(s)): student {_iv(j['student'][f'jitter@{m}'])} / teacher "
                     f"{_iv(j['teacher'][f'jitter@{m}'])} (at {j['compared_at']}); ratio {_iv(j['ratio'])}")
        if "agreement_ratio" in j:
            key = f"pairwise_agreement@{m}"
            lines.append(f"  {key}: student {_iv(j['student'][key])} / teacher {_iv(j['teacher'][key])}; ratio "
                         f"{_iv(j['agreement_ratio'])} (> 1: agrees more with itself)")
    sens = stab.get("sensitivity")
    if sens and "ratio" in sens:
        st, te = sens["student"], sens["teacher"]
        lines.append(f"sensitivity to {len(sens['edits'])} prompt edits ({sens['prompts']} prompts): KL student "
                     f"{_iv(st['kl'], '.4f')} / teacher {_iv(te['kl'], '.4f')}, ratio {_iv(sens['ratio'])}; top-1 "
                     f"flips {st['flip']['value']:.3f} / {te['flip']['value']:.3f}")
        control = set(sens.get("control_edits") or [])
        per = sens.get("per_edit_ratio") or {}
        if per:
            lines.append("  per edit, KL student / teacher: " + "; ".join(
                f"{e}{' (control)' if e in control else ''} {_iv(r)}" for e, r in per.items()))
        c = sens.get("control")
        if c and "ratio" in c:
            lines.append(f"  control {', '.join(c['edits'])} (not meaning-preserving for the next token, not in the "
                         f"ratio above): KL student {_iv(c['student']['kl'], '.4f')} / teacher "
                         f"{_iv(c['teacher']['kl'], '.4f')}, ratio {_iv(c['ratio'])}")
        if "excess_kl" in sens:
            lines.append(f"  excess KL from the teacher on edited prompts, KL(T(x')‖S(x')) - KL(T(x)‖S(x)): "
                         f"{_iv(sens['excess_kl'], '.4f')} (KL to the teacher on the originals "
                         f"{_iv(sens['kl_to_teacher_original'], '.4f')})")
    elif sens and "skipped" in sens:
        lines.append(f"sensitivity skipped: {sens['skipped']}")
    c = stab.get("confidence")
    if c:
        st, te = c["student"], c["teacher"]
        greedy = st.get("ece_vs_teacher_greedy") or st.get("ece")
        lines.append(f"low confidence (top-1 p < {c['threshold']}, {c.get('prompts', '?')} prompts): student "
                     f"{_iv(st['low_confidence'])} / teacher {_iv(te['low_confidence'])}, ratio {_iv(c['ratio'])}"
                     + (f"; mean top-1 p {_iv(st['mean_top1_prob'])} / {_iv(te['mean_top1_prob'])}"
                        if "mean_top1_prob" in st else ""))
        if "ece_next_token" in st:
            lines.append(f"  calibration vs the reference text's next token: ECE student {_iv(st['ece_next_token'])} "
                         f"/ teacher {_iv(te['ece_next_token'])} (difference {_iv(c['ece_next_token_difference'])}); "
                         f"NLL {_iv(st['nll_next_token'])} / {_iv(te['nll_next_token'])} (difference "
                         f"{_iv(c['nll_next_token_difference'])})")
        if greedy:
            lines.append(f"  ECE vs teacher greedy {_iv(greedy)}")
    return lines + [f"note: {n}" for n in stab.get("notes", [])]
