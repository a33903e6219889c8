"""README results table for a bundle: teacher vs student, measured side by side in one run.

Size, sparsity, held-out KL / top-1 (from the bundle's validation), repeat-prompt consistency, and ONNX Runtime
greedy-decoding latency of both (the teacher exported the same way, same prompts, alternated rounds).

    .venv/bin/python scripts/results_table.py dist/demo [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from sparsekd_deploy.bundle import Bundle
from sparsekd_deploy.exporters.onnx import export_onnx
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget
from sparsekd_deploy.validate.references import References


def ms_per_token(target, prompts: np.ndarray, tokens: int) -> float:
    start = time.perf_counter()
    target.generate(prompts, tokens)
    return (time.perf_counter() - start) * 1000 / (tokens * len(prompts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    b = Bundle.open(args.bundle)
    m = b.manifest
    v = json.loads((b.path / "validation.json").read_text())
    refs = References.load(b)
    prompts = refs.tensors["input_ids"][:1, :16]
    with tempfile.TemporaryDirectory() as tmp:
        teacher_onnx = Path(tmp) / "teacher.onnx"
        export_onnx(m["teacher"]["path"], teacher_onnx)
        teacher, student = OnnxRuntimeTarget(teacher_onnx, threads=2), OnnxRuntimeTarget(b.model_path, threads=2)
        t_ms, s_ms = [], []
        for _ in range(args.rounds):
            t_ms.append(ms_per_token(teacher, prompts, args.tokens))
            s_ms.append(ms_per_token(student, prompts, args.tokens))
        t_size, s_size = teacher_onnx.stat().st_size, b.model_path.stat().st_size
    mm, c = v["metrics"], v["metrics"]["consistency"]
    pk = next(k for k in c["student"] if k.startswith("pairwise"))
    params = m["student"]["parameters"]
    rows = [
        ("parameters", f"{params['teacher']:,}", f"{params['student']:,} ({m['achieved_sparsity']:.0%} of prunable weights zero, {m['pattern']})"),
        ("model.onnx (fp32)", f"{t_size / 1e6:.1f} MB", f"{s_size / 1e6:.1f} MB (zeros stored dense in ONNX)"),
        ("KL(teacher‖student) on reference prompts, top-32 buckets", "0", f"{mm['kl_topk']:.4f}"),
        ("same, full vocabulary", "0", f"{mm['kl_full']:.4f}" if mm.get("kl_full") is not None else "teacher absent"),
        ("top-1 agreement with teacher", "1.000", f"{mm['top1_agreement']:.3f}"),
        ("greedy 16-token match", "1.00", f"{mm['greedy_match']:.2f}"),
        ("perplexity ratio", "1.000", f"{mm['ppl_ratio']:.3f}"),
        (f"sampling entropy at τ={c['temperature']} (nats)", f"{c['teacher']['mean_entropy']:.3f}", f"{c['student']['mean_entropy']:.3f}"),
        (f"{pk} at τ={c['temperature']}", f"{c['teacher'][pk]:.3f}", f"{c['student'][pk]:.3f}"),
        ("ORT CPU greedy decode, ms/token (2 threads)", f"{statistics.median(t_ms):.2f}", f"{statistics.median(s_ms):.2f}"),
    ]
    print("| | teacher | student |\n| --- | --- | --- |")
    for name, t, s in rows:
        print(f"| {name} | {t} | {s} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
