"""What ``--fsdp`` saves per rank against DDP: the product's ``distill`` launched twice, side by side in one run, under
``torchrun --standalone --nproc_per_node 2`` (2 gloo ranks on CPU) — DDP (no flag), then ``--fsdp``.

Same teacher, recipe, seed and global batch in both: a Llama built here from a config (seeded, saved as a normal
safetensors dir with the demo teacher's tokenizer), one 2:4 stage of a few steps, ``--teacher-access topk:K`` so
that the teacher is freed before training (checked: the run must say "teacher freed" and its stage record must carry
no teacher precision) and what differs between the modes is the student's state: weights, gradients, AdamW moments.

Numbers read from the runs' own stage records (``trajectory.json``, stage 1), nothing measured beside them:

- peak memory per rank: ``ranks.peak_memory_mb``, every rank's ``core.memory.PeakMemory`` over the stage (CPU: the
  process's resident-set high-water mark, VmHWM, reset through /proc/self/clear_refs when the stage begins, after
  the teacher was freed). Not ``resource.getrusage``: its ``ru_maxrss`` is the same kernel high-water mark, which
  the stage's reset clears, and a whole-process peak would be set by the setup (teacher in memory, top-K cache
  written), not by training. ``start_memory_mb`` (the main process's RSS at the reset) is printed too;
- parameter elements each rank holds: ``ranks.local_parameters``;
- training tokens/s (``tokens_per_second``, the stage's, both ranks' tokens) and the final held-out KL (``kl``).

    .venv/bin/python scripts/bench_fsdp_memory.py                  # defaults: ~32 M-parameter Llama, 8 steps
    .venv/bin/python scripts/bench_fsdp_memory.py --layers 4 --steps 2 --out /tmp/x   # smaller, quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"ddp": [], "fsdp": ["--fsdp"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_fsdp_memory",
                    help="teacher, recipe and both runs go here (replaced on each run)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="training steps of the one 2:4 stage")
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (each of the 2 ranks trains on half)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--topk", type=int, default=16, help="--teacher-access topk:K")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="glibc's M_MMAP_THRESHOLD for the ranks (MALLOC_MMAP_THRESHOLD_): a fixed one gives every "
                         "allocation above it back to the OS when freed, so the RSS peak follows live memory")
    args = ap.parse_args(argv)
    for name in ("hidden", "intermediate", "layers", "heads", "steps", "batch_size", "seq_len", "topk", "nproc"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.hidden % args.heads:
        ap.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.nproc < 2:
        ap.error("--nproc must be ≥ 2: --fsdp shards over the ranks of a launched run")
    if args.batch_size % args.nproc:
        ap.error(f"--batch-size {args.batch_size} is the global batch: --nproc {args.nproc} must divide it")
    return args


def build_teacher(args, path: Path) -> int:
    """A seeded Llama from a config, with the demo teacher's tokenizer (vocabulary 4096); returns its parameters."""
    import torch
    import transformers as tf

    from sparsekd_deploy.models.loading import load_tokenizer

    demo = ROOT / "sparsekd_deploy" / "demo" / "teacher"
    tok = load_tokenizer(demo)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=max(256, args.seq_len), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, initializer_range=0.05)  # wider than 0.02: outputs not uniform
    torch.manual_seed(args.seed)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def write_recipe(args, teacher: Path, path: Path) -> None:
    values = dict(teacher=str(teacher), pattern="2:4", stages=1, steps_per_stage=args.steps, retries=0,
                  kl_budget=50.0, lr_search="off", seq_len=args.seq_len, num_samples=4 * args.batch_size,
                  heldout_samples=args.batch_size, batch_size=args.batch_size, calib_batches=1, seed=args.seed,
                  teacher_access=f"topk:{args.topk}", consistency_prompts=2, consistency_samples=2,
                  consistency_tokens=4, consistency_m=2)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))


def launch(mode: str, args, recipe: Path) -> dict:
    out = args.out / mode
    cli = Path(sys.executable).with_name("sparsekd-deploy")  # the installed console script (cli.py has no __main__)
    if not cli.is_file():
        sys.exit(f"error: {cli} not found: install the package into this interpreter's environment (pip install -e .)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "--no-python", str(cli), "distill", "--recipe", str(recipe), "--out", str(out), *MODES[mode]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"error: the {mode} run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    if "teacher freed from memory" not in r.stderr:
        sys.exit(f"error: the {mode} run did not free its teacher before training; its numbers would not compare")
    stage = json.loads((out / "trajectory.json").read_text())["stages"][-1]
    if "teacher_precision" in stage:
        sys.exit(f"error: the {mode} run's stage record says a teacher was in memory ({stage['teacher_precision']})")
    return {"wall_s": wall, **stage}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    params = build_teacher(args, args.out / "teacher")
    write_recipe(args, args.out / "teacher", args.out / "recipe.yaml")
    print(f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads, "
          f"vocabulary 4096: {params / 1e6:.1f} M parameters (fp32 weights + grads + AdamW moments = "
          f"{params * 16 / 2**20:.0f} MiB whole); one 2:4 stage of {args.steps} steps, global batch "
          f"{args.batch_size} × {args.seq_len}, topk:{args.topk}, seed {args.seed}, {args.nproc} gloo ranks")
    runs = {}
    for mode in MODES:
        runs[mode] = launch(mode, args, args.out / "recipe.yaml")
        print(f"  {mode}: {runs[mode]['wall_s']:.0f} s wall", flush=True)
    d, f = runs["ddp"], runs["fsdp"]
    print("\n| rank | DDP peak MiB | FSDP peak MiB | FSDP / DDP | DDP params held | FSDP params held | FSDP / DDP |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in range(args.nproc):
        pd, pf = d["ranks"]["peak_memory_mb"][r], f["ranks"]["peak_memory_mb"][r]
        nd, nf = d["ranks"]["local_parameters"][r], f["ranks"]["local_parameters"][r]
        print(f"| {r} | {pd:,.0f} | {pf:,.0f} | {pf / pd:.3f} | {nd:,} | {nf:,} | {nf / nd:.3f} |")
    print(f"\nrank 0's RSS when the stage began: DDP {d['start_memory_mb']:,.0f} MiB, FSDP {f['start_memory_mb']:,.0f} MiB"
          " (FSDP: its shard + the whole CPU copy it keeps)")
    print(f"training tokens/s: DDP {d['tokens_per_second']:,.0f}, FSDP {f['tokens_per_second']:,.0f} "
          f"(FSDP / DDP {f['tokens_per_second'] / d['tokens_per_second']:.3f})")
    print(f"final held-out KL ({d.get('kl_measure', 'full')}): DDP {d['kl']:.6g}, FSDP {f['kl']:.6g}, "
          f"|Δ| {abs(d['kl'] - f['kl']):.2g} (relative {abs(d['kl'] - f['kl']) / max(abs(d['kl']), 1e-30):.2g})")
    ckd, ckf = d["checkpoints"], f["checkpoints"]
    if [c[0] for c in ckd] != [c[0] for c in ckf]:
        print(f"held-out measurements at different steps: DDP {[c[0] for c in ckd]}, FSDP {[c[0] for c in ckf]}")
    else:
        print(f"max |ΔKL| over the stage's {len(ckd)} held-out measurements: "
              f"{max(abs(a[1] - b[1]) for a, b in zip(ckd, ckf, strict=True)):.2g}")
    print(f"wall: DDP {d['wall_s']:.0f} s, FSDP {f['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
