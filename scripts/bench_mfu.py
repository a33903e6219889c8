"""Issue #12's GPU bar: model-FLOPs utilisation of a distillation's training steps, ≥ 1 B-parameter student, bf16.

Runs the product's own `distill` (library entry point, the code path `sparsekd-deploy distill` takes): one 2:4 stage
of ``--steps`` optimizer steps on a Llama built from a config (TinyLlama's shape by default: hidden 2048, 22 layers,
intermediate 5632, 32 heads / 4 KV heads, vocab 32000 — 1.1 B parameters), random weights, teacher in memory, the
student trained under bf16 autocast (`--precision auto` on a bf16 GPU). MFU is the stage record's own ``mfu``
(``core/flops.py``: student forward + backward and the teacher's forward per trained token, over the stage's training
time — the first step's warm-up (60 steps by default keep it a small share), mask enforcement, gradient clipping and
AdamW included — against the GPU's dense bf16 peak); the
student-only share is printed beside it.

The data are uniform random token ids instead of teacher samples: the teacher's weights are random, so its samples
would be noise too, and sampling 1 B parameters on the CPU (where the data-free set is drawn) would take the minutes
the benchmark has. What is timed does not depend on the ids.

    python scripts/bench_mfu.py [--steps 60] [--batch 8] [--seq 2048] [--json out.json]
    python scripts/bench_mfu.py --tiny   # CPU smoke run of the same path (no MFU on a CPU)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

BAR = 0.35


def build_teacher(out: Path, args) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(2048, args.seq), bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds, not minutes
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)  # half the bytes to write; loaded as fp32
    return sum(p.numel() for p in model.parameters())


class Progress:
    """Prints the run's events with the seconds since the start (the benchmark has no progress bar), and the stage
    record's throughput as soon as the stage ends — before its checkpoint and the final student are written."""

    def __init__(self, on_record):
        self.t0, self.step, self.on_record = time.perf_counter(), 0, on_record

    def _print(self, what: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {what}", flush=True)

    def note(self, message: str) -> None:
        self._print(message)

    def stage_begin(self, label: str, steps: int) -> None:
        self._print(f"stage {label}: {steps} steps")

    def advance(self, loss: float) -> None:
        self.step += 1
        if self.step % 10 == 1:
            self._print(f"step {self.step}: loss {loss:.4f}")

    def add_steps(self, steps: int) -> None: ...

    def stage_end(self, record: dict) -> None:
        self._print(f"stage {record['label']} ended")
        self.on_record(record)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--tiny", action="store_true", help="a small model, for a CPU smoke run of the same path")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads = 64, 2, 128, 4, 2
        args.vocab, args.seq, args.batch, args.steps = 512, 64, 4, 4
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure (--tiny runs the same path on a CPU)")
        return 2

    from sparsekd_deploy.config import build_config
    from sparsekd_deploy.core import teacher as teacher_module
    from sparsekd_deploy.core.distill import distill

    n_train, n_heldout = 4 * args.batch, args.batch

    def random_ids(cfg, _teacher, _tokenizer):
        gen = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(3, args.vocab, (n_train + n_heldout, cfg.seq_len), generator=gen)
        return ids[:n_train], ids[n_train:]

    teacher_module.build_data = random_ids  # distill reads it through the module (see the docstring: why)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        params = build_teacher(Path(tmp) / "teacher", args)
        # Through build_config, as the CLI does: it resolves the pattern's defaults (a DistillConfig made directly
        # leaves allocation unset, and the run would analyse every layer's load path first — minutes on 1 B).
        cfg = build_config(None, dict(
            teacher=str(Path(tmp) / "teacher"), out=str(Path(tmp) / "run"), pattern="2:4", stages=1,
            steps_per_stage=args.steps, retries=0, kl_budget=1e6, lr_search="off", seq_len=args.seq,
            batch_size=args.batch, num_samples=n_train, heldout_samples=n_heldout, calib_batches=1,
            consistency_prompts=2, consistency_samples=2, consistency_tokens=4, consistency_m=2))
        print(f"teacher ({params / 1e9:.2f} B parameters) built and saved in {time.perf_counter() - t0:.1f} s", flush=True)
        distill(cfg, reporter=Progress(lambda rec: report(rec, params, args, t0)))
    return 0


def report(record: dict, params: int, args, t0: float) -> None:
    """Print and write the stage record's throughput (called as the stage ends)."""
    wall = time.perf_counter() - t0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res = {"device": device, "torch": torch.__version__, "parameters": params, "batch": args.batch, "seq": args.seq,
           "steps": args.steps, "tokens_per_second": record["tokens_per_second"], "mfu": record.get("mfu"),
           "model_tflops_per_second": record.get("model_tflops_per_second"), "mfu_peak": record.get("mfu_peak"),
           "peak_memory_mb": record.get("peak_memory_mb"), "seconds_to_stage_end": round(wall, 1), "bar": BAR}
    if res["mfu"] is not None:
        # The student's share of the counted FLOPs: 3 forward passes of the student for 1 of the teacher (same shape).
        res["mfu_student_only"] = round(res["mfu"] * 3 / 4, 4)
        print(f"{device}: {params / 1e9:.2f} B parameters, batch {args.batch} x {args.seq}, {args.steps} steps, bf16")
        print(f"  {res['tokens_per_second']:.0f} tokens/s, {res['model_tflops_per_second']} TFLOP/s of model FLOPs "
              f"→ MFU {res['mfu']:.1%} (student + teacher forward), {res['mfu_student_only']:.1%} student only "
              f"(bar ≥ {BAR:.0%}); peak {res['peak_memory_mb']} MB")
    else:
        print(f"{device}: {res['tokens_per_second']} tokens/s; no MFU ({record.get('mfu_peak', 'not on a CUDA GPU')})")
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
