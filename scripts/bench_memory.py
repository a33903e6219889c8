"""Peak memory of one distillation step, KD loss chunked vs unchunked (issue 12, part 4's bar).

The bar model is built from a config (Llama, hidden 256, 2 layers, vocabulary 131072; teacher and student seeded
differently so the loss is not zero), batch 4 × 512 tokens, forward-KL through power:1, AdamW. Each mode runs in a
fresh subprocess (nothing one mode allocated can linger into the other's numbers) and does exactly what the distiller
does for one step (``core.kd_objective.KDObjective``: forward, loss, backward, clip, optimizer step).

Memory, measured honestly on a CPU: torch has no allocator statistics there and tracemalloc does not see its
allocations, so the peak is the process's resident-set high-water mark (VmHWM), reset through /proc/self/clear_refs
right before the step (``core.memory.PeakMemory``, what the stage records carry). Printed: the process peak over the
step (libraries, both models, Adam state and the step) and the step's own rise above the RSS just before it.

    .venv/bin/python scripts/bench_memory.py              # both modes, side by side, ratio vs the bar (≤ 0.35×)
    .venv/bin/python scripts/bench_memory.py --chunk 128  # another chunk size (default: automatic, as distill does)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

BAR_MEMORY = 0.35
BAR_LOSS = 1e-4


def rss_mb() -> float:
    import re

    return int(re.search(r"^VmRSS:\s+(\d+)", open("/proc/self/status").read(), re.M).group(1)) / 1024


def one_step(chunk_setting: int | None, chunked: bool, seed: int) -> dict:
    import torch
    import transformers as tf

    from sparsekd_deploy.core.kd_objective import KDObjective
    from sparsekd_deploy.core.losses import kd_chunk_tokens, make_loss
    from sparsekd_deploy.core.memory import PeakMemory, release_memory
    from sparsekd_deploy.core.operators import make_operator

    torch.set_num_threads(2)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=131072, max_position_embeddings=512)
    torch.manual_seed(seed)
    teacher = tf.LlamaForCausalLM(cfg).eval()
    torch.manual_seed(seed + 1)
    student = tf.LlamaForCausalLM(cfg).train()
    B, L = 4, 512
    ids = torch.randint(cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))
    chunk = kd_chunk_tokens(chunk_setting, B * L, cfg.vocab_size) if chunked else 0
    kd = KDObjective(make_operator("power:1"), make_loss("forward-kl"), chunk)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4)
    release_memory()
    before = rss_mb()
    peak = PeakMemory("cpu")
    peak.reset()
    t0 = time.perf_counter()
    loss = kd(student, teacher, ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    got = peak.read()
    return {"chunk": chunk, "loss": loss.item(), "peak_rss_mb": got["peak_memory_mb"], "kind": got["peak_memory_kind"],
            "rss_before_mb": round(before, 1), "step_rise_mb": round(got["peak_memory_mb"] - before, 1),
            "seconds": round(seconds, 2), "params": sum(p.numel() for p in student.parameters())}


def run_mode(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--seed", str(args.seed)]
    if args.chunk is not None:
        cmd += ["--chunk", str(args.chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, help="tokens per chunk (default: automatic, as distill chooses)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=["chunked", "unchunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_step(args.chunk, args.child == "chunked", args.seed)))
        return
    res = {mode: run_mode(mode, args) for mode in ("unchunked", "chunked")}
    u, c = res["unchunked"], res["chunked"]
    print("bar model: Llama hidden 256, 2 layers, vocab 131072, batch 4 × 512; one step (forward-KL, power:1, AdamW); "
          f"student {u['params']:,} parameters; memory = {u['kind']} (VmHWM)")
    print(f"{'':26}{'unchunked':>14}{'chunked':>14}{'ratio':>10}")
    print(f"{'tokens per chunk':26}{'-':>14}{c['chunk']:>14}")
    for key, label in (("peak_rss_mb", "peak RSS of the step, MB"), ("step_rise_mb", "rise above pre-step, MB"),
                       ("seconds", "step time, s")):
        print(f"{label:26}{u[key]:>14.1f}{c[key]:>14.1f}{c[key] / u[key]:>9.3f}×")
    diff = abs(u["loss"] - c["loss"])
    print(f"{'loss':26}{u['loss']:>14.6f}{c['loss']:>14.6f}   |Δ| {diff:.2e}")
    ratio = c["peak_rss_mb"] / u["peak_rss_mb"]
    print(f"bar: peak ≤ {BAR_MEMORY}× → {ratio:.3f}× {'PASS' if ratio <= BAR_MEMORY else 'FAIL'}; "
          f"loss within {BAR_LOSS:g} → {'PASS' if diff <= BAR_LOSS else 'FAIL'}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
