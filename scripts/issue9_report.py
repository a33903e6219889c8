"""Issue 9's tables and bars from the cached cells of ``scripts/bench_issue9.sh`` (no training: reads the caches).

Every ratio is taken per seed against the same seed's reference cell (paired), then averaged; KL is the test-set KL
(teacher samples the distiller never saw). Prints Markdown for the README, and writes ``runs/issue9_kl.png``.

    .venv/bin/python scripts/issue9_report.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "runs"
SEEDS = (0, 1, 2)
LABELS = {"magnitude": "magnitude one-shot", "wanda": "Wanda one-shot", "oneshot-kd": "one-shot Wanda + KD",
          "oneshot-kd-loadpath": "one-shot + KD + load-path", "staged": "staged, uniform",
          "staged-loadpath": "staged + load-path", "staged2": "2 stages", "oneshot-kd-gradual": "one stage, gradual demolition",
          "staged-gradual": "staged, gradual demolition", "fisher": "Fisher one-shot", "oneshot-kd-fisher": "one-shot Fisher + KD",
          "staged2-fisher": "2 stages, Fisher", "wanda-ls": "Wanda one-shot + LS refit", "fisher-ls": "Fisher one-shot + LS refit",
          "oneshot-kd-fisher-ls": "one-shot Fisher + LS refit + KD", "staged2-fisher-ls": "2 stages, Fisher + LS refit",
          "staged-fisher-ls": "staged (3), Fisher + LS refit", "default": "default recipe (1 stage, Fisher + LS, lr search)"}
# Channels 0.5 (issue 9's channel bar): every variant measured, in the order of the README's table.
CHANNEL_METHODS = ["wanda", "oneshot-kd", "staged", "staged2", "oneshot-kd-gradual", "staged-gradual", "fisher",
                   "oneshot-kd-fisher", "staged2-fisher", "wanda-ls", "fisher-ls", "oneshot-kd-fisher-ls",
                   "staged2-fisher-ls", "staged-fisher-ls", "default"]


def cells(root: Path) -> dict[tuple, dict]:
    out = {}
    for f in root.glob("*/*/*/seed*.json"):
        rec = json.loads(f.read_text())
        if rec.get("status") == "ok":
            out[(rec["model"], rec["pattern"], rec["method"], rec["seed"])] = rec
    return out


def kl(c, model, pattern, method):
    got = [c.get((model, pattern, method, s)) for s in SEEDS]
    return None if None in got else [r["test_kl"] for r in got]


def paired_ratio(a, b):
    return statistics.mean(x / y for x, y in zip(a, b, strict=True))


def table(c: dict, model: str, patterns: list[str], methods: list[str], ref: str = "oneshot-kd") -> list[str]:
    rows = [f"| pattern | method | test KL (seeds {', '.join(map(str, SEEDS))}) | mean | × one-shot + KD (paired) | "
            "top-1 | entropy student / teacher |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in patterns:
        base = kl(c, model, p, ref)
        best = None
        for m in methods:
            k = kl(c, model, p, m)
            if k is None:
                continue
            recs = [c[(model, p, m, s)] for s in SEEDS]
            top1 = statistics.mean(r["test_top1"] for r in recs)
            hs = statistics.mean(r["entropy"]["mean_entropy"] for r in recs)
            ht = statistics.mean(r["teacher_entropy"]["mean_entropy"] for r in recs)
            ratio = f"{paired_ratio(k, base):.3f}" if base and m != ref else ""
            rows.append(f"| {p} | {LABELS.get(m, m)} | {' / '.join(f'{x:.4f}' for x in k)} | {statistics.mean(k):.4f} | "
                        f"{ratio} | {top1:.3f} | {hs:.3f} / {ht:.3f} |")
            if best is None or statistics.mean(k) < best[1]:
                best = (m, statistics.mean(k))
        if best:
            rows.append(f"| | *winner: {LABELS.get(best[0], best[0])}* | | | | | |")
    return rows


def plot(c: dict, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in ("wanda", "oneshot-kd", "staged", "staged-loadpath"):
        xs, ys, lo, hi = [], [], [], []
        for p in ("unstructured:0.5", "unstructured:0.7", "unstructured:0.8", "unstructured:0.9"):
            k = kl(c, model, p, m)
            if k:
                xs.append(float(p.split(":")[1]))
                ys.append(statistics.mean(k))
                lo.append(ys[-1] - min(k))
                hi.append(max(k) - ys[-1])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=LABELS[m])
    for m, marker in (("oneshot-kd", "s"), ("staged", "^")):
        for p, x in (("2:4", 0.5), ("channels:0.5", 0.52)):
            k = kl(c, model, p, m)
            if k:
                ax.scatter([x], [statistics.mean(k)], marker=marker, color="gray")
                ax.annotate(f"{p} {LABELS[m]}", (x, statistics.mean(k)), fontsize=7, xytext=(4, -8),
                            textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test KL(teacher‖student), nats/token")
    ax.set_title(f"{model} teacher: KL vs sparsity, same step budget, mean of 3 seeds (bars: min–max)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    c = {**cells(ROOT / "bench_matrix"), **cells(ROOT / "bench_alloc07")}
    demo_patterns = ["2:4", "unstructured:0.5", "unstructured:0.7", "unstructured:0.8", "unstructured:0.9",
                     "channels:0.5"]
    methods = ["magnitude", "wanda", "oneshot-kd", "oneshot-kd-loadpath", "staged", "staged-loadpath"]
    print("### demo teacher\n")
    print("\n".join(table(c, "demo", demo_patterns, methods)))
    print("\n### wide teacher (GPT-2 shape)\n")
    print("\n".join(table(c, "wide", ["2:4", "unstructured:0.8", "channels:0.5"], methods)))
    for model in ("demo", "wide"):
        print(f"\n### channels 0.5, {model} teacher\n")
        print("\n".join(table(c, model, ["channels:0.5"], CHANNEL_METHODS)))
    print("\n### bars\n")
    for label, model, p, m, ref in (
            ("unstructured 0.8: default recipe (staged + load-path) / one-shot + KD", "demo", "unstructured:0.8",
             "staged-loadpath", "oneshot-kd"),
            ("unstructured 0.8: staged uniform / one-shot + KD", "demo", "unstructured:0.8", "staged", "oneshot-kd"),
            ("unstructured 0.8: staged + load-path / one-shot + KD + load-path", "demo", "unstructured:0.8",
             "staged-loadpath", "oneshot-kd-loadpath"),
            ("channels 0.5: staged / one-shot + KD", "demo", "channels:0.5", "staged", "oneshot-kd"),
            ("channels 0.5: default recipe (1 stage, Fisher + LS refit, lr search) / one-shot Wanda + KD", "demo",
             "channels:0.5", "default", "oneshot-kd"),
            ("channels 0.5: staged (3), Fisher + LS refit / one-shot Wanda + KD", "demo", "channels:0.5",
             "staged-fisher-ls", "oneshot-kd"),
            ("channels 0.5: staged (3) / one stage, both Fisher + LS refit (what staging buys)", "demo",
             "channels:0.5", "staged-fisher-ls", "oneshot-kd-fisher-ls"),
            ("wide channels 0.5: default recipe / one-shot Wanda + KD", "wide", "channels:0.5", "default",
             "oneshot-kd"),
            ("wide channels 0.5: staged (3), Fisher + LS refit / one-shot Wanda + KD", "wide", "channels:0.5",
             "staged-fisher-ls", "oneshot-kd"),
            ("wide channels 0.5: staged (3) / one stage, both Fisher + LS refit", "wide", "channels:0.5",
             "staged-fisher-ls", "oneshot-kd-fisher-ls"),
            ("unstructured 0.7: load-path / uniform allocation (staged)", "demo", "unstructured:0.7",
             "staged-loadpath", "staged"),
            ("2:4: 3-stage recipe / one-shot + KD (the default is now 1 stage = one-shot + KD)", "demo", "2:4",
             "staged", "oneshot-kd"),
            ("wide unstructured 0.8: staged uniform / one-shot + KD", "wide", "unstructured:0.8", "staged",
             "oneshot-kd"),
            ("wide unstructured 0.8: staged + load-path / one-shot + KD", "wide", "unstructured:0.8",
             "staged-loadpath", "oneshot-kd"),
            ("wide channels 0.5: staged / one-shot + KD", "wide", "channels:0.5", "staged", "oneshot-kd"),
            ("wide 2:4: 3-stage recipe / one-shot + KD", "wide", "2:4", "staged", "oneshot-kd")):
        a, b = kl(c, model, p, m), kl(c, model, p, ref)
        if a and b:
            wins = sum(x < y for x, y in zip(a, b, strict=True))
            print(f"- {label}: **{paired_ratio(a, b):.3f} ×** (mean {statistics.mean(a):.4f} vs {statistics.mean(b):.4f}; "
                  f"lower on {wins} of {len(SEEDS)} seeds)")
        else:
            print(f"- {label}: not measured (cells missing)")
    sweep = {}
    for lr_dir in sorted((ROOT / "bench_lr_sweep").glob("lr*")):
        k = kl(cells(lr_dir), "wide", "2:4", "oneshot-kd")
        if k:
            sweep[float(lr_dir.name[2:])] = statistics.mean(k)
    default = kl(c, "wide", "2:4", "oneshot-kd")
    if default:
        sweep[5e-4] = statistics.mean(default)
    if sweep:
        best = min(sweep.values())
        print("\nwide 2:4 default recipe, lr sweep (mean test KL of 3 seeds): "
              + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(sweep.items()))
              + f"; default 5e-4 / best = **{sweep.get(5e-4, float('nan')) / best:.3f} ×**")
    auto = ROOT / "auto-005.json"
    if auto.is_file():
        s = json.loads(auto.read_text())
        print(f"\nunstructured:auto --kl-budget 0.05 (demo, seed 0): {s['reason']}; held-out KL {s['kl']:.4f}, "
              f"sparsity {s['sparsity']:.3f}")
    for model in ("demo", "wide"):
        plot(c, model, ROOT / f"issue9_kl_{model}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
