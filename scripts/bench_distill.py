"""Issue #2 bars, measured side by side in one run on the demo teacher (2:4, data-free, same seed and data).

1. Quality at an equal optimizer-step budget: staged SparseKD vs one-shot magnitude / Wanda (no training)
   vs one-shot Wanda + KD (all steps after a single prune). Held-out KL and top-1 agreement.
2. Consistency: teacher vs student (τ = 1 and 0.7) for each loss, at the same KL budget.
3. Speed: the staged loop's training throughput vs a plain KD loop on the same model and batch.

    .venv/bin/python scripts/bench_distill.py [--steps 300] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core.distill import StagedDistiller, distill
from sparsekd_deploy.core.evaluate import heldout_metrics
from sparsekd_deploy.core.importance import ScoringContext, score
from sparsekd_deploy.core.losses import kd_loss
from sparsekd_deploy.core.oneshot import one_shot as prune_once
from sparsekd_deploy.core.pruner import apply_masks
from sparsekd_deploy.core.rundir import RunDir

TEMPS = [1.0, 0.7]


def base(tmp: Path, name: str, **kw):
    opts = dict(out=str(tmp / name), consistency_temperatures=TEMPS, consistency_prompts=16, consistency_samples=16,
                consistency_tokens=16, kl_budget=0.15, retries=0)
    opts.update(kw)
    return build_config(None, opts)


def one_shot(cfg, criterion: str) -> dict:
    """Prune straight to 2:4 with no training (the classic post-training baselines)."""
    d = prune_once(cfg, criterion)
    m = heldout_metrics(d.teacher, d.raw, d.heldout_ids, cfg.batch_size, d.device)
    return {**m, "consistency": d.consistency_of(d.raw), "teacher_consistency": d.teacher_consistency}


def trained(cfg) -> dict:
    res = distill(cfg, overwrite=True)
    last = [r for r in res.trajectory if r["accepted"]][-1]
    return {"kl": last["kl"], "top1": last["top1"], "reached": res.reached_target, "final_stage": res.summary["final_stage"],
            "consistency": last["consistency"]["student"], "teacher_consistency": last["consistency"]["teacher"]}


def throughput(cfg, steps: int, repeats: int) -> dict:
    """Staged loop (masks enforced every step, accelerate, clipping) vs a plain KD loop; alternated A/B."""
    d = StagedDistiller(cfg)
    d.run = RunDir(cfg.out)
    d.run.prepare(False, True)
    d._setup(False)
    calib = list(d.train_ids[: cfg.batch_size].split(cfg.batch_size))
    d.masks = d.pruner.stage_masks(score("magnitude", ScoringContext(d.raw, d.pruner.layers, calib)), 1.0)
    apply_masks(d.raw, d.masks)

    import copy

    plain = copy.deepcopy(d.raw).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)

    def plain_loop(n):
        start = time.perf_counter()
        for _ in range(n):
            ids = d.train_ids[torch.randint(len(d.train_ids), (cfg.batch_size,), generator=gen)]
            with torch.no_grad():
                t = d.teacher(input_ids=ids).logits
            loss = kd_loss(t, plain(input_ids=ids).logits, d.operator, d.loss_fn)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return n * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)

    staged, baseline = [], []
    for r in range(repeats):
        d.reset_throughput()
        d.train_steps(d.batches(r), 0, steps, steps, cfg.lr, "bench")
        staged.append(d.tokens_per_second)
        baseline.append(plain_loop(steps))
    s, b = statistics.median(staged), statistics.median(baseline)
    return {"staged_tokens_per_s": round(s, 1), "plain_kd_tokens_per_s": round(b, 1), "ratio": round(s / b, 3)}


def cons_row(c: dict, t: str) -> str:
    x = c[t]
    return f"H={x['mean_entropy']:.3f} pair@4={x['pairwise_agreement@4']:.3f} modal@4={x['modal_share@4']:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="total optimizer steps for every trained method")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer steps and losses (a smoke run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    steps = 30 if args.quick else args.steps
    losses = ["forward-kl", "reverse-kl"] if args.quick else ["forward-kl", "reverse-kl", "js", "mixed:0.5"]
    results: dict = {"steps_budget": steps, "stages": args.stages}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["magnitude_one_shot"] = one_shot(base(tmp, "m"), "magnitude")
        results["wanda_one_shot"] = one_shot(base(tmp, "w"), "wanda")
        results["wanda_one_shot_kd"] = trained(base(tmp, "wk", stages=1, steps_per_stage=steps, kl_budget=10.0))
        for loss in losses:
            cfg = base(tmp, f"s-{loss}", stages=args.stages, steps_per_stage=steps // args.stages, loss=loss)
            results[f"staged[{loss}]"] = trained(cfg)
        results["staged[forward-kl, equal split]"] = trained(base(
            tmp, "s-eq", stages=args.stages, steps_per_stage=steps // args.stages, step_schedule="equal"))
        results["staged[forward-kl, 2 stages]"] = trained(base(tmp, "s-2", stages=2, steps_per_stage=steps // 2))
        results["staged[forward-kl, linear]"] = trained(base(
            tmp, "s-lin", stages=args.stages, steps_per_stage=steps // args.stages, sparsity_schedule="linear"))
        results["throughput"] = throughput(base(tmp, "tp", kl_budget=10.0), 10 if args.quick else 40, 3)

    print(f"\n== quality (demo teacher, 2:4, {steps} optimizer steps for every trained method) ==")
    print(f"{'method':34s} {'held-out KL':>12s} {'top-1':>7s}")
    extra = ["staged[forward-kl, equal split]", "staged[forward-kl, 2 stages]", "staged[forward-kl, linear]"]
    for name in ["magnitude_one_shot", "wanda_one_shot", "wanda_one_shot_kd"] + [f"staged[{x}]" for x in losses] + extra:
        r = results[name]
        print(f"{name:34s} {r['kl']:12.4f} {r['top1']:7.3f}")
    staged = results["staged[forward-kl]"]
    ratio = staged["kl"] / results["wanda_one_shot"]["kl"]
    print(f"staged / wanda one-shot KL = {ratio:.3f} (bar ≤ 0.25: {'PASS' if ratio <= 0.25 else 'FAIL'})")
    print(f"staged vs one-shot wanda+KD: {staged['kl']:.4f} vs {results['wanda_one_shot_kd']['kl']:.4f} "
          f"({'PASS' if staged['kl'] <= results['wanda_one_shot_kd']['kl'] else 'FAIL'}: staged ≤ one-shot+KD)")

    print("\n== repeat-prompt consistency (16 prompts × 16 samples × 16 tokens) ==")
    teacher_c = staged["teacher_consistency"]
    for t in [f"{x:g}" for x in TEMPS]:
        print(f"τ={t}  teacher                      {cons_row(teacher_c, t)}")
        for name in ["wanda_one_shot", "wanda_one_shot_kd"] + [f"staged[{x}]" for x in losses]:
            r = results[name]
            steady = r["consistency"][t]["mean_entropy"] <= teacher_c[t]["mean_entropy"] and \
                r["consistency"][t]["pairwise_agreement@4"] >= teacher_c[t]["pairwise_agreement@4"]
            in_budget = r["kl"] <= 0.15
            print(f"τ={t}  {name:28s} {cons_row(r['consistency'], t)}  KL {r['kl']:.4f}"
                  f"  {'≥ teacher' if steady else '< teacher'}{'' if in_budget else ' (over KL budget)'}")

    tp = results["throughput"]
    print(f"\n== training throughput (same model, batch, CPU) ==\nstaged loop {tp['staged_tokens_per_s']} tok/s, "
          f"plain KD loop {tp['plain_kd_tokens_per_s']} tok/s, ratio {tp['ratio']} (bar ≥ 0.9: "
          f"{'PASS' if tp['ratio'] >= 0.9 else 'FAIL'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
