"""Staged SparseKD vs one-shot Wanda + KD at the same optimizer-step budget, over several seeds.

One seed is one data-free distillation set (sampled from the teacher) and one training order, so the gap between
two methods is only meaningful next to the spread between seeds. Prints per-seed held-out KL, the mean, and the
paired difference (staged − one-shot) per seed.

    .venv/bin/python scripts/bench_staged_vs_oneshot.py [--steps 300] [--seeds 0 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench_distill import base, trained

METHODS = {
    "one-shot Wanda + KD": lambda steps: dict(stages=1, steps_per_stage=steps, kl_budget=10.0),
    "staged (3, linear)": lambda steps: dict(stages=3, steps_per_stage=steps // 3),
    "staged (3, cubic)": lambda steps: dict(stages=3, steps_per_stage=steps // 3, sparsity_schedule="cubic"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    kl: dict[str, dict[int, float]] = {m: {} for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for i, (name, opts) in enumerate(METHODS.items()):
                r = trained(base(Path(tmp), f"{seed}-{i}", seed=seed, **opts(args.steps)))
                kl[name][seed] = r["kl"]
                print(f"seed {seed}  {name:22s} KL {r['kl']:.4f}  top-1 {r['top1']:.3f}", flush=True)
    ref = "one-shot Wanda + KD"
    print(f"\n== held-out KL, 2:4, {args.steps} steps, seeds {args.seeds} ==")
    print(f"{'method':22s} " + " ".join(f"{'seed ' + str(s):>9s}" for s in args.seeds) + f" {'mean':>8s} {'Δ vs one-shot':>14s}")
    for name, per in kl.items():
        diffs = [per[s] - kl[ref][s] for s in args.seeds]
        print(f"{name:22s} " + " ".join(f"{per[s]:9.4f}" for s in args.seeds) + f" {statistics.mean(per.values()):8.4f}"
              + ("" if name == ref else f" {statistics.mean(diffs):+14.4f}"))
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "kl": kl}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
