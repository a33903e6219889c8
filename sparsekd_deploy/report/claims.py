"""Plain sentences saying which of SparseKD's claims held for this student, and which did not.

A stability claim is judged on its interval, not its point value: "held" only when the whole 95 % interval of the
student/teacher ratio lies at or below 1 (the student is at least as steady), "did not hold" when it lies above 1,
"not shown" when it straddles 1 (the data cannot tell). And it counts only beside the KL claim: a collapsed model is
"stable" too.
"""

from __future__ import annotations

from dataclasses import dataclass

from .collect import ReportData

HELD, NOT_HELD, NOT_SHOWN, NOT_MEASURED = "held", "did not hold", "not shown", "not measured"

# The stability measurements validate records (metrics.stability.<key>), what "steadier" means for each.
STABILITY = {
    "jitter": "more consistent answers to repeated prompts",
    "sensitivity": "less erratic responses to small, meaning-preserving input edits",
    "confidence": "fewer low-confidence positions (where hallucinations start)",
}


@dataclass
class Claim:
    name: str
    verdict: str
    sentence: str


def interval(x) -> tuple[float, float, float] | None:
    """(value, low, high) when all three are finite numbers; anything else (absent, null, NaN, a 1e9 placeholder
    of a zero denominator) is no interval at all — never a verdict."""
    import math

    if isinstance(x, dict) and all(isinstance(x.get(k), (int, float)) and not isinstance(x.get(k), bool)
                                   for k in ("value", "low", "high")):
        v, lo, hi = float(x["value"]), float(x["low"]), float(x["high"])
        if all(math.isfinite(t) and abs(t) < 1e6 for t in (v, lo, hi)) and lo <= v <= hi:
            return v, lo, hi
    return None


def _kl_claim(data: ReportData) -> Claim:
    stages = [s for s in data.trajectory.get("stages", []) if isinstance(s, dict)]
    budget = data.trajectory.get("budget")
    accepted = [s for s in stages if s.get("accepted") and s.get("stage", 0) > 0]
    if not accepted:
        return Claim("heavy removal without collapse", NOT_HELD,
                     f"No pruning stage was accepted ({data.trajectory.get('reason', 'no reason recorded')}).")
    last = accepted[-1]
    kl, sp = last.get("kl"), last.get("sparsity")
    within = isinstance(kl, (int, float)) and isinstance(budget, (int, float)) and kl <= budget
    reached = data.status == "complete"
    verdict = HELD if within and reached else NOT_HELD
    how = f"{sp:.0%} of the prunable weights removed" if isinstance(sp, (int, float)) else "weights removed"
    text = (f"{how}, held-out KL {kl:.4f} nats against a budget of {budget}" if isinstance(kl, (int, float))
            else how)
    if not reached:
        text += f"; the run stopped before its target ({data.trajectory.get('reason', data.status)})"
    return Claim("heavy removal without collapse", verdict, text + ".")


def _validation_claim(data: ReportData) -> Claim | None:
    v = data.validation
    if not v:
        return None
    failed = [g.get("gate") for g in v.get("gates", []) if not g.get("passed")]
    rt = (v.get("runtime") or {}).get("runtime", "?")
    kl = (v.get("metrics") or {}).get("kl_topk")
    kl_s = f", top-k KL {kl:.4f}" if isinstance(kl, (int, float)) else ""
    if v.get("passed"):
        return Claim(f"close to the teacher on {rt}", HELD, f"Every gate passed on {rt}{kl_s}.")
    return Claim(f"close to the teacher on {rt}", NOT_HELD, f"Gates failed on {rt}: {', '.join(failed)}{kl_s}.")


def _stability_claims(data: ReportData, kl_ok: bool) -> list[Claim]:
    stab = ((data.validation or {}).get("metrics") or {}).get("stability")
    out = []
    for key, promise in STABILITY.items():
        m = stab.get(key) if isinstance(stab, dict) else None
        ratio = interval(m.get("ratio")) if isinstance(m, dict) else None
        if ratio is None:
            recorded_why = (m.get("ratio") or {}).get("why") if isinstance(m, dict) and isinstance(
                m.get("ratio"), dict) else None
            why = "the bundle was not validated" if not data.validation else recorded_why or \
                "its references were recorded before this measurement existed, or it was skipped"
            out.append(Claim(promise, NOT_MEASURED, f"Not measured: {why}."))
            continue
        value, lo, hi = ratio
        prompts = m.get("prompts")
        over = f" over {prompts} prompts" if isinstance(prompts, int) else ""
        span = f"student/teacher ratio {value:.3f} (95 % interval {lo:.3f}–{hi:.3f}{over})"
        if lo == hi == value:
            # A degenerate interval (e.g. 0/0 on every resample: both sides never vary) shows nothing.
            out.append(Claim(promise, NOT_SHOWN, f"The measurement is degenerate ({span}): nothing can be told."))
            continue
        if hi <= 1.0:
            verdict, text = HELD, f"The student is at least as steady as the teacher: {span}."
        elif lo > 1.0:
            verdict, text = NOT_HELD, f"The student is less steady than the teacher: {span}."
        else:
            verdict, text = NOT_SHOWN, f"The data cannot tell the two apart: {span} includes 1."
        if verdict == HELD and (worse := _qualifier(key, m)):
            verdict, text = NOT_SHOWN, f"{text} It does not count: {worse}."
        if verdict == HELD and not kl_ok:
            verdict, text = NOT_SHOWN, text + " It does not count: the KL claim did not hold (a collapsed model is steady too)."
        out.append(Claim(promise, verdict, text))
    return out


def _qualifier(key: str, m: dict) -> str | None:
    """Why a ratio that looks steadier does not count: fewer low-confidence positions with a worse calibration
    against the true next token is overconfidence; less sensitivity with more extra drift from the teacher on the
    edited prompts is a flatter model, not a steadier one."""
    if key == "confidence" and (nll := interval(m.get("nll_next_token_difference"))) and nll[1] > 0:
        return (f"the student's calibration against the next token is worse (NLL +{nll[0]:.3f}, interval "
                f"{nll[1]:.3f}–{nll[2]:.3f}): fewer unsure positions here means overconfidence")
    if key == "sensitivity" and (ex := interval(m.get("excess_kl"))) and ex[1] > 0:
        return (f"on edited prompts the student drifts further from the teacher (extra KL {ex[0]:.4f}, interval "
                f"{ex[1]:.4f}–{ex[2]:.4f})")
    return None


def claims(data: ReportData) -> list[Claim]:
    kl = _kl_claim(data)
    val = _validation_claim(data)
    kl_ok = kl.verdict == HELD and (val is None or val.verdict == HELD)
    return [kl, *([val] if val else []), *_stability_claims(data, kl_ok)]
