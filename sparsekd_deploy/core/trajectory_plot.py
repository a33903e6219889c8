"""The staged-demolition curve: held-out KL, top-1 agreement and consistency after every stage."""

from __future__ import annotations

from pathlib import Path


def plot_trajectory(trajectory: list[dict], budget: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    xs = [f"{r['label']}\n{r['sparsity']:.0%}" for r in trajectory]
    ok = [r["accepted"] for r in trajectory]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))

    ax = axes[0]
    kl = [r["kl"] if r["kl"] is not None else float("nan") for r in trajectory]
    ax.plot(xs, [r["kl_after_prune"] for r in trajectory], "o--", color="tab:orange",
            label="right after pruning (a QAT stage: after fake-quantizing)")
    ax.plot(xs, kl, "o-", color="tab:blue", label="after distillation")
    for x, k, a in zip(xs, kl, ok, strict=True):
        if not a:
            ax.plot([x], [k], "x", color="red", markersize=12, label="rejected stage")
    ax.axhline(budget, color="red", lw=1, ls=":", label=f"KL budget {budget:g}")
    ax.set_title("held-out KL(teacher‖student)")
    ax.set_ylabel("nats / token")
    ax.legend(fontsize=8)

    ax = axes[1]
    ax.plot(xs, [r["top1"] if r["top1"] is not None else float("nan") for r in trajectory], "o-", color="tab:green")
    ax.set_ylim(0, 1.02)
    ax.set_title("top-1 agreement with the teacher")

    ax = axes[2]
    with_c = [(x, r) for x, r in zip(xs, trajectory, strict=True) if "consistency" in r]
    if with_c:
        temps = list(with_c[0][1]["consistency"]["teacher"])
        for t in temps:
            ax.plot([x for x, _ in with_c], [r["consistency"]["student"][t]["mean_entropy"] for _, r in with_c],
                    "o-", label=f"student τ={t}")
            ax.axhline(with_c[0][1]["consistency"]["teacher"][t]["mean_entropy"], ls=":", color="gray",
                       label=f"teacher τ={t}")
    ax.set_title("sampling entropy along paths (lower = steadier)")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8)

    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("staged demolition: each stage prunes, distills, and is accepted only within the KL budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
