"""Teacher top-K cache vs the teacher in memory, on the demo teacher (issue 12, part 3's bar).

Per seed, fresh-subprocess runs of the same distillation (2:4, one stage, the same steps, batch and data-free set):
``--teacher-access logits`` (teacher in memory, full-vocabulary loss) once, then for each K ``--teacher-access
topk:K`` (one teacher pass writes the top-K cache, the teacher is freed, training and held-out measurements read the
cache) and ``topk:K`` with the KD loss in chunks of 128 tokens. Side by side, from each run's stage record:

* **tensor peak** — "peak training memory" here: the high-water mark of the bytes of all live CPU tensors (weights,
  gradients, AdamW moments, the teacher while it is in memory, activations, logits, loss buffers) over the stage's
  first 3 optimizer steps (``PeakMemory(tensor_steps=3)``, ``core/memory.py``): the CPU twin of what
  ``torch.cuda.max_memory_allocated`` reports on a GPU, i.e. without the process's libraries, Python heap and the
  page cache. Every step of the stage has the same shapes, so the first steps hold its peak (held-out measurements
  run without gradients and are lower);
* **RSS peak** of the whole process over the stage (``peak_memory_mb``: VmHWM reset at the stage start) and its rise
  above the RSS at that start, in the same run: what the machine had to provide, libraries included;
* training tokens/s of the stage (optimizer steps only; the tensor tracking slows the first 3 of them) — the one-off
  teacher pass that writes the cache is timed apart;
* full-vocabulary KL(teacher‖student) of the final student on a test set the run never saw (teacher samples,
  seed + 10 000), measured with the teacher, for every mode alike.

    .venv/bin/python scripts/bench_topk_cache.py                    # seed 0, 60 steps, K 64
    .venv/bin/python scripts/bench_topk_cache.py --seeds 0 1 2 --steps 60 --k 64 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARS = {"memory": 0.6, "tokens_per_second": 1.2, "kl": 0.10}
TEST_SEED_OFFSET = 10_000
TENSOR_STEPS = 3


def rss_mb() -> float:
    import re

    return int(re.search(r"^VmRSS:\s+(\d+)", open("/proc/self/status").read(), re.M).group(1)) / 1024


def modes(ks: list[int]) -> list[str]:
    return ["logits"] + [m for k in ks for m in (f"topk:{k}", f"topk:{k}+chunk")]


def mode_config(mode: str) -> dict:
    if mode == "logits":
        return {"teacher_access": "logits"}
    access, _, chunk = mode.partition("+")
    return {"teacher_access": access, **({"kd_chunk": 128} if chunk else {})}


def child(mode: str, seed: int, steps: int, test_samples: int) -> dict:
    import functools

    import torch

    torch.set_num_threads(2)
    from sparsekd_deploy.config import build_config
    from sparsekd_deploy.core import distill as distill_module
    from sparsekd_deploy.core import topk_cache
    from sparsekd_deploy.core.distill import distill
    from sparsekd_deploy.core.evaluate import heldout_metrics
    from sparsekd_deploy.core.memory import PeakMemory
    from sparsekd_deploy.core.teacher import sample_teacher_data
    from sparsekd_deploy.models.loading import demo_teacher_dir, load_model

    baseline = rss_mb()
    timed = {"cache_seconds": 0.0}
    orig = topk_cache.TopKCache.open_or_write.__func__

    def timed_open(cls, *a, **kw):
        t0 = time.perf_counter()
        try:
            return orig(cls, *a, **kw)
        finally:
            timed["cache_seconds"] += time.perf_counter() - t0

    topk_cache.TopKCache.open_or_write = classmethod(timed_open)
    distill_module.PeakMemory = functools.partial(PeakMemory, tensor_steps=TENSOR_STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(None, {
            "out": str(Path(tmp) / "run"), "pattern": "2:4", "stages": 1, "steps_per_stage": steps, "retries": 0,
            "kl_budget": 10.0, "seed": seed, **mode_config(mode),
            "consistency_prompts": 2, "consistency_samples": 2, "consistency_tokens": 4})
        t0 = time.perf_counter()
        res = distill(cfg)
        wall = time.perf_counter() - t0
        stage = res.trajectory[-1]
        teacher = load_model(demo_teacher_dir(), role="teacher").eval()
        student = load_model(res.out / "student").eval()
        test = sample_teacher_data(teacher, None, test_samples, cfg.seq_len, seed + TEST_SEED_OFFSET)
        m = heldout_metrics(teacher, student, test, cfg.batch_size, torch.device("cpu"))
    return {"mode": mode, "seed": seed, "steps": stage["steps"], "batch": [cfg.batch_size, cfg.seq_len],
            "tensor_peak_mb": stage["peak_tensor_mb"], "tensor_start_mb": stage["start_tensor_mb"],
            "tensor_steps": stage["tensor_steps"],
            "peak_mb": stage["peak_memory_mb"], "start_mb": stage["start_memory_mb"], "kind": stage["peak_memory_kind"],
            "baseline_mb": round(baseline, 1),
            "tokens_per_second": stage["tokens_per_second"], "cache_seconds": round(timed["cache_seconds"], 1),
            "run_seconds": round(wall, 1), "heldout_kl_recorded": stage["kl"], "test_kl": m["kl"],
            "test_top1": m["top1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--k", type=int, nargs="+", default=[64])
    ap.add_argument("--test-samples", type=int, default=64)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seed, args.steps, args.test_samples)))
        return
    names = modes(args.k)
    rows = []
    for seed in args.seeds:
        for mode in names:
            cmd = [sys.executable, __file__, "--child", mode, "--seed", str(seed), "--steps", str(args.steps),
                   "--test-samples", str(args.test_samples)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"demo teacher, 2:4, 1 stage × {args.steps} steps, batch {rows[0]['batch'][0]} × {rows[0]['batch'][1]}, "
          f"top-K cache vs teacher in memory (MB; ratios vs logits): tensor peak = live CPU tensors over the first "
          f"{TENSOR_STEPS} steps; RSS peak/rise = whole process over the stage ({rows[0]['kind']})")
    cols = [("tensor", lambda r: r["tensor_peak_mb"], "{:.0f}"), ("RSS peak", lambda r: r["peak_mb"], "{:.0f}"),
            ("RSS rise", lambda r: r["peak_mb"] - r["start_mb"], "{:.0f}"),
            ("tok/s", lambda r: r["tokens_per_second"], "{:.0f}"), ("test KL", lambda r: r["test_kl"], "{:.4f}")]
    print(f"{'seed':>4} {'mode':<15}" + "".join(f"{c:>10}{'×':>7}" for c, _, _ in cols) + f"{'tensors@start':>15}")
    ratios: dict[str, dict[str, list[float]]] = {m: {c: [] for c, _, _ in cols} for m in names if m != "logits"}
    for seed in args.seeds:
        by = {r["mode"]: r for r in rows if r["seed"] == seed}
        for mode in names:
            r, line = by[mode], f"{seed:>4} {mode:<15}"
            for c, get, fmt in cols:
                ratio = get(r) / get(by["logits"])
                line += f"{fmt.format(get(r)):>10}{ratio:>7.3f}"
                if mode != "logits":
                    ratios[mode][c].append(ratio)
            print(line + f"{r['tensor_start_mb']:>15.1f}")
    mean = {m: {c: sum(v) / len(v) for c, v in cs.items()} for m, cs in ratios.items()}
    cache_s = [r["cache_seconds"] for r in rows if r["mode"] != "logits"]
    print(f"teacher pass writing the cache: {min(cache_s):.1f}-{max(cache_s):.1f} s (once per cache; reused by later "
          "runs with the same teacher, tokenizer and data); RSS rise = RSS peak - RSS at the stage's start")
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    for mode, m in mean.items():
        print(f"bars, {mode} (mean over {len(args.seeds)} seed(s)): peak training memory (tensors) ≤ {BARS['memory']}× → "
              f"{m['tensor']:.3f}× ({verdict(m['tensor'] <= BARS['memory'])}; whole-process RSS peak {m['RSS peak']:.3f}×, "
              f"RSS rise {m['RSS rise']:.3f}×); tokens/s ≥ {BARS['tokens_per_second']}× → {m['tok/s']:.3f}× "
              f"({verdict(m['tok/s'] >= BARS['tokens_per_second'])}); test KL within {BARS['kl']:.0%} → "
              f"{m['test KL']:.3f}× ({verdict(abs(m['test KL'] - 1) <= BARS['kl'])})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
