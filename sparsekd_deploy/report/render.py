"""Render the report: Jinja2 templates → one self-contained HTML page (figures inlined as data URIs, no network) and
a Markdown twin for pull requests (figures written beside it)."""

from __future__ import annotations

import base64
import datetime as _dt
from pathlib import Path

from .. import __version__
from .claims import STABILITY, claims, interval
from .collect import ReportData
from .plots import figures


def _fmt(x, spec=".4f") -> str:
    if isinstance(x, bool) or x is None:
        return {True: "yes", False: "no", None: "—"}[x]
    if isinstance(x, int) and spec == ".4f":
        return str(x)  # a count, not a measurement
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _iv(x) -> str:
    iv = interval(x)
    if iv is None:
        return _fmt(x) if isinstance(x, (int, float)) else "—"
    return f"{iv[0]:.3f} [{iv[1]:.3f}, {iv[2]:.3f}]"


# Beside each headline ratio, the statistics that qualify it (validate records them; absent ones are skipped).
EXTRA_ROWS = {
    "jitter": (("agreement_ratio", "pairwise agreement student / teacher (higher = steadier; jitter is saturated)"),),
    "sensitivity": (("excess_kl", "extra KL to the teacher on edited prompts (≤ 0 = no extra drift)"),),
    "confidence": (("mean_top1_prob_ratio", "mean top-1 probability student / teacher"),
                   ("ece_next_token_difference", "ECE vs the next token: student − teacher"),
                   ("nll_next_token_difference", "NLL vs the next token: student − teacher")),
}


def stability_rows(data: ReportData) -> tuple[list[dict], list[str]]:
    """One row per (measurement, statistic): teacher and student with their intervals; then the ratio row."""
    stab = ((data.validation or {}).get("metrics") or {}).get("stability")
    if not isinstance(stab, dict):
        return [], []
    rows = []
    for key in STABILITY:
        m = stab.get(key)
        if not isinstance(m, dict):
            continue
        # Compare like with like: where the student drew more samples than the teacher's reference holds, its
        # statistics at the teacher's N (some, e.g. distinct_2, depend on N).
        student, teacher = m.get("student_at_compared") or m.get("student") or {}, m.get("teacher") or {}
        for stat in sorted(set(student) | set(teacher)):
            if interval(student.get(stat)) or interval(teacher.get(stat)):
                rows.append({"measurement": key, "statistic": stat, "teacher": _iv(teacher.get(stat)),
                             "student": _iv(student.get(stat))})
        if "ratio" in m:
            rows.append({"measurement": key, "statistic": "student / teacher", "teacher": "",
                         "student": _iv(m["ratio"]) if interval(m["ratio"]) else
                         f"not measured: {(m['ratio'] or {}).get('why', 'no interval')}", "ratio": True})
        for field, label in EXTRA_ROWS.get(key, ()):
            if interval(m.get(field)):
                rows.append({"measurement": key, "statistic": label, "teacher": "", "student": _iv(m[field])})
        for edit, iv in sorted((m.get("per_edit_ratio") or {}).items()):
            if interval(iv):
                control = " (control: not meaning-preserving for the next token)" if edit in (
                    m.get("control_edits") or []) else ""
                rows.append({"measurement": key, "statistic": f"edit {edit}: student / teacher{control}",
                             "teacher": "", "student": _iv(iv)})
    notes = [str(n) for n in stab.get("notes", [])] if isinstance(stab.get("notes"), list) else []
    return rows, notes


def context(data: ReportData) -> dict:
    stages = [s for s in data.trajectory.get("stages", []) if isinstance(s, dict)]
    m = data.manifest or {}
    v = data.validation or {}
    layers = (data.sparsity or {}).get("layers") if isinstance((data.sparsity or {}).get("layers"), dict) else {}
    srows, snotes = stability_rows(data)
    metrics = v.get("metrics") or {}
    return {
        "d": data, "title": f"SparseKD report: {data.name}", "tool": f"sparsekd-deploy {__version__}",
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "claims": claims(data), "fmt": _fmt,
        "summary": [
            ("pattern", data.trajectory.get("pattern") or m.get("pattern")),
            ("status", f"{data.status} — {data.trajectory.get('reason', '')}"),
            ("KL budget (nats / token)", data.trajectory.get("budget")),
            ("stages", max((s.get("stage", 0) for s in stages), default=0)),
            ("overall sparsity", _fmt((data.sparsity or {}).get("overall_sparsity", m.get("achieved_sparsity")), ".1%")),
            ("parameters teacher → student", " → ".join(
                f"{x:,}" for x in ((m.get("student") or {}).get("parameters") or {}).values()) or "—"),
            ("teacher weights sha256", str((m.get("teacher") or {}).get("weights_sha256", "—"))[:16]),
        ],
        "stages": stages,
        "layers": [{"name": n, "sparsity": _fmt(x.get("sparsity"), ".1%"), "pattern": x.get("pattern", ""),
                    "holds": x.get("pattern_holds", True)} for n, x in layers.items()],
        "validation": v, "runtime": v.get("runtime") or {}, "gates": v.get("gates") or [],
        "key_metrics": [(k, _fmt(metrics.get(k))) for k in ("kl_topk", "kl_full", "top1_agreement", "greedy_match",
                                                            "ppl_ratio", "consistency_ratio") if k in metrics],
        "stability_rows": srows, "stability_notes": snotes,
        "engine": data.engine, "missing": data.missing,
    }


def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("sparsekd_deploy.report", "templates"), undefined=StrictUndefined,
                       autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def render_html(data: ReportData, figs: dict[str, bytes] | None = None) -> str:
    figs = figures(data) if figs is None else figs
    uris = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in figs.items()}
    return _env().get_template("report.html.j2").render(**context(data), figs=uris)


def render_markdown(data: ReportData, assets_rel: str, figs: dict[str, bytes]) -> str:
    links = {k: f"{assets_rel}/{k}.png" for k in figs}
    return _env().get_template("report.md.j2").render(**context(data), figs=links)


def write_report(data: ReportData, html_out: Path, md_out: Path | None) -> list[Path]:
    """Write the page (and the Markdown twin + its figures); each file appears whole or not at all."""
    from ..fsutil import write_bytes_atomic

    figs = figures(data)
    html_out.parent.mkdir(parents=True, exist_ok=True)
    written = [write_bytes_atomic(html_out, render_html(data, figs).encode())]
    if md_out is not None:
        assets = md_out.with_name(md_out.stem + "_files")
        assets.mkdir(parents=True, exist_ok=True)
        for k, png in figs.items():
            written.append(write_bytes_atomic(assets / f"{k}.png", png))
        written.append(write_bytes_atomic(md_out, render_markdown(data, assets.name, figs).encode()))
    return written
