"""The report's figures as PNG bytes (inlined into the HTML, written beside the Markdown)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from .claims import STABILITY, interval
from .collect import ReportData


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def trajectory_png(data: ReportData) -> bytes | None:
    from ..core.trajectory_plot import plot_trajectory

    stages = [s for s in data.trajectory.get("stages", []) if isinstance(s, dict)]
    needed = ("label", "sparsity", "kl", "kl_after_prune", "top1", "accepted")
    if not stages or not all(all(k in s for k in needed) for s in stages):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_trajectory(stages, float(data.trajectory.get("budget") or 0.0), Path(tmp) / "t.png")
        return path.read_bytes()


def layer_sparsity_png(data: ReportData) -> bytes | None:
    layers = (data.sparsity or {}).get("layers")
    if not isinstance(layers, dict) or not layers:
        return None
    names = list(layers)
    values = [float(layers[n].get("sparsity", 0.0)) for n in names]
    holds = [layers[n].get("pattern_holds", True) for n in names]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.22 * len(names) + 1)))
    ax.barh(range(len(names)), values, color=["tab:blue" if h else "tab:red" for h in holds])
    ax.set_yticks(range(len(names)), [n.replace("model.", "") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of weights removed (red: the pattern does not hold)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def stability_png(data: ReportData) -> bytes | None:
    """Student/teacher ratio with its 95 % interval for each stability measurement (left of 1 = steadier)."""
    stab = ((data.validation or {}).get("metrics") or {}).get("stability")
    rows = []
    for key, promise in STABILITY.items():
        m = stab.get(key) if isinstance(stab, dict) else None
        if isinstance(m, dict) and (iv := interval(m.get("ratio"))):
            rows.append((promise, *iv))
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.2))
    for i, (_, v, lo, hi) in enumerate(rows):
        colour = "tab:green" if hi <= 1 else ("tab:red" if lo > 1 else "tab:gray")
        ax.errorbar([v], [i], xerr=[[v - lo], [hi - v]], fmt="o", color=colour, capsize=4)
    ax.axvline(1.0, color="black", lw=1, ls=":")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("student / teacher (95 % interval); below 1 = the student is steadier")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def figures(data: ReportData) -> dict[str, bytes]:
    """Name → PNG for every figure the data allows (none without matplotlib: the page says so)."""
    out = {}
    for name, make in (("trajectory", trajectory_png), ("layer_sparsity", layer_sparsity_png),
                       ("stability", stability_png)):
        png = make(data)
        if png:
            out[name] = png
    return out
