"""README results table for a bundle: teacher vs student, measured side by side in one run.

Size, sparsity, held-out KL / top-1 (from the bundle's validation), repeat-prompt consistency, and ONNX Runtime
greedy-decoding latency of both (the teacher exported the same way, same prompts, alternated rounds).

Then one row per graph precision the bundle carries (fp32, fp16, int8, …): file size, and what that graph's own
last validation recorded (validation/by-model/): full-vocabulary KL, top-1, greedy match, consistency ratio and
greedy decode speed with the runtime that measured it. A graph never validated, or validated before decode speed
was recorded, says so ("not validated", "not measured"): no number is filled in. ``--precisions-only`` prints just
that table (no teacher export, no timing).

    .venv/bin/python scripts/results_table.py dist/demo [--rounds 5] [--precisions-only]
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


def precision_rows(b: Bundle) -> list[tuple[str, ...]]:
    """(precision, file, KL, top-1, greedy, consistency, decode) per graph of the bundle, from its own records."""
    from sparsekd_deploy.precisions import PRECISIONS, manifest_key
    from sparsekd_deploy.validate.validator import per_model_record

    model = b.manifest["model"]
    fp32_bytes = (b.path / model["onnx"]).stat().st_size
    rows = []
    for precision in PRECISIONS:
        rel = model.get(manifest_key(precision))
        if not isinstance(rel, str) or not (b.path / rel).is_file():
            continue
        size = (b.path / rel).stat().st_size
        file = f"{size / 1e6:.1f} MB" + (f" ({size / fp32_bytes:.2f}× fp32)" if precision != "fp32" else "")
        rec = b.read_json(per_model_record(rel), "validation record", "rerun `sparsekd-deploy validate`")
        if rec is None:
            rows.append((precision, file, "not validated", "not validated", "not validated", "not validated",
                         "not measured"))
            continue
        mm = rec.get("metrics", {})
        decode = mm.get("decode") or {}
        rt = rec.get("runtime", {})
        speed = (f"{decode['tokens_per_s']:.1f} tok/s ({rt.get('runtime', '?')} {rt.get('provider', '')}, batch 1)"
                 if isinstance(decode.get("tokens_per_s"), (int, float)) else "not measured")
        kl_full = mm.get("kl_full")
        rows.append((precision, file, f"{kl_full:.4f}" if isinstance(kl_full, (int, float)) else "teacher absent",
                     f"{mm['top1_agreement']:.3f}", f"{mm['greedy_match']:.2f}", f"{mm['consistency_ratio']:.3f}",
                     speed))
    return rows


def print_precisions(b: Bundle) -> None:
    print("\n| precision | file | full KL vs teacher | top-1 | greedy match | consistency ratio | greedy decode |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in precision_rows(b):
        print("| " + " | ".join(row) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--precisions-only", action="store_true", help="only the per-precision table (recorded numbers)")
    args = ap.parse_args()
    b = Bundle.open(args.bundle)
    if args.precisions_only:
        print_precisions(b)
        return 0
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
    print_precisions(b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
