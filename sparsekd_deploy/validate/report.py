"""Validation output: a rich table, ``validation.json`` and PNG plots (per-prompt KL; teacher vs student consistency)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .stability import stability_lines


def print_table(report: dict, console: Console) -> None:
    table = Table(title=f"validation on {report['runtime'].get('runtime')} ({report['runtime'].get('provider', '')})")
    for col in ("gate", "value", "threshold", "result"):
        table.add_column(col, justify="left" if col == "gate" else "right")
    for row in report["gates"]:
        v = row["value"]
        value = f"{v:.4f}" if isinstance(v, float) else str(v)
        table.add_row(row["gate"], value, f"{row['op']} {row['threshold']}",
                      "[green]pass[/green]" if row["passed"] else "[red]FAIL[/red]")
    console.print(table)
    for row in report["gates"]:
        if row.get("note"):  # why a gate reads as it does (e.g. int8-dynamic's batch-dependent ranges)
            console.print(f"{row['gate']}: {row['note']}", markup=False, highlight=False)
    c = report["metrics"]["consistency"]
    m = next(k for k in c["student"] if k.startswith("pairwise"))
    console.print(f"consistency at τ={c['temperature']}: entropy student {c['student']['mean_entropy']:.3f} / teacher "
                  f"{c['teacher']['mean_entropy']:.3f} nats; {m} {c['student'][m]:.3f} / {c['teacher'][m]:.3f}")
    for line in stability_lines(report["metrics"].get("stability") or {}):
        console.print(line, markup=False, highlight=False)
    if report["metrics"].get("kl_full") is not None:
        console.print(f"full-vocabulary KL (teacher present): {report['metrics']['kl_full']:.4f}")
    console.print(f"verdict: {'[bold green]PASS[/bold green]' if report['passed'] else '[bold red]FAIL[/bold red]'}")


PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (a lean device install; it comes with [full])"


def can_plot() -> bool:
    """Plots are optional: a device-side install has no matplotlib, and validation works without them."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    kl = report["metrics"]["kl_topk_per_prompt"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(kl)), kl, color="tab:blue")
    ax.axhline(report["thresholds"]["max_kl"], color="red", ls=":", label=f"gate {report['thresholds']['max_kl']}")
    ax.set_xlabel("prompt")
    ax.set_ylabel("KL top-k (nats/token)")
    ax.set_title(f"per-prompt KL(teacher‖student) on {report['runtime'].get('runtime')}")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "kl_per_prompt.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    c = report["metrics"]["consistency"]
    keys = [k for k in c["student"] if k != "mean_entropy"] + ["mean_entropy"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3.2))
    for ax, k in zip(axes, keys, strict=True):
        ax.bar(["teacher", "student"], [c["teacher"][k], c["student"][k]], color=["gray", "tab:green"])
        ax.set_title(k, fontsize=9)
    fig.suptitle(f"repeat-prompt consistency at τ={c['temperature']} (same prompts, same seeds)")
    fig.tight_layout()
    paths.append(out_dir / "consistency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
