"""Issue 13 bars, side by side in one run: what quantization buys on ONNX Runtime CPU, and what it costs in KL.

Part 1, speed and size: a Llama built from a config (hidden 1024, 8 layers, intermediate 2816, vocab 32000, random
weights, pruned 2:4 by magnitude so the audit has zeros to prove), exported once; the same graph fp32 vs each
quantized copy this tool makes (``sparsekd_deploy.exporters.quantize``), alternated over rounds, medians: greedy decode
tokens/s (batch 1, 16-token prompt, KV cache) and 512-token prefill ms, file size; every quantized copy audited.
"int8 (trt QDQ)" is the int8 graph made for --target tensorrt (symmetric int8 activations) run on ORT's CPU provider:
why the onnxruntime target's int8 uses uint8 activations instead. "plain dynamic" is the issue's reference, a plain
``onnxruntime.quantization.quantize_dynamic(per_channel=True)`` with default settings of the same graph, run in the
same rounds with the same session options, next to the plain fp32 graph it came from ("fp32 (plain)"). The
onnxruntime target's graphs (fp32, int8-dynamic, int8, int4-weight) carry ORT's fused attention
(``exporters/ort_attention.py``, applied after quantizing, as build / export do); each row's "x fp32" is against the
fp32 graph of its own kind, so the fused pair and the plain pair are each the same graph fp32 vs quantized (the table
says whether the product's int8-dynamic before the fusion is byte-identical to the plain one). "int8 (trt QDQ)" is
never fused (TensorRT's graph stays standard ONNX). ``--profile`` adds ORT's per-op-type kernel times of one
512-token prefill of the four graphs: what quantization cannot speed up (attention) bounds the prefill ratio.

Part 2, quality: a distillation run's 2:4 student (default the demo's) exported fp32 and quantized (static modes
calibrated on the run's training split), each scored on the run's held-out sequences against the teacher: full-
vocabulary KL(teacher‖x) and top-1 agreement, next to the fp32 student's. "int8 (ORT default ops)" is
``quantize_static`` left to choose its nodes (every MatMul, attention and rotary included, and their outputs), what
``--quantize int8`` did before it kept to the weight-bearing inputs. "int8 (trt QDQ)" and "fp8 (trt QDQ)" are the
graphs ``--target tensorrt`` writes (symmetric int8 activations; float8 e4m3fn with amax / 448 scales), run on ORT's
CPU provider, which emulates their Q/DQ in float (no FP8 kernels: quality only, no speed; TensorRT runs them on an FP8
GPU). With ``--qat-run`` (a run made with
``--quantize int8|fp8 --qat-steps N``, for its ``qat_target``) the fp32 student is that run's last pruning stage (its
checkpoint, before the QAT stage) and two more rows show its QAT-trained student: float, and quantized as the stage
simulated (int8 / fp8 for onnxruntime or the trt QDQ); the QAT stage's recorded fake-quantized KLs are printed above.

    .venv/bin/python scripts/bench_quantize.py [--run dist/demo.run] [--qat-run RUN] [--rounds 5]
        [--cache runs/bench_quantize] [--modes int8-dynamic,int8,int4-weight,int8-trt] [--skip-speed] [--skip-quality]
        [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparsekd_deploy.exporters.audit import audit_onnx, pruned_weights
from sparsekd_deploy.exporters.onnx import export_onnx
from sparsekd_deploy.exporters.ort_attention import fuse_attention
from sparsekd_deploy.exporters.quantize import quantize_onnx, quantized_path
from sparsekd_deploy.pipeline.export_step import calibration_feeds
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget

MODES = ("int8-dynamic", "int8", "int4-weight")
BAR_POSITIONS = 2048  # the bar model's max_position_embeddings (its rotary caches are cut to it, as build does)
SPEED_MODES = MODES + ("int8-trt",)  # int8-trt: the --target tensorrt int8 graph, run on ORT CPU
TRT_QUALITY_MODES = ("int8", "fp8")  # quality part: the --target tensorrt graphs, Q/DQ emulated on ORT CPU


def bar_model(cache: Path) -> tuple[Path, dict]:
    """The bar's Llama, 2:4 by magnitude, exported once (cached): (model.onnx, pruned weights [out, in])."""
    from safetensors.numpy import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsekd_deploy.core.patterns import NM
    from sparsekd_deploy.core.pruner import Pruner, apply_masks

    onnx_path, zeros = cache / "model.onnx", cache / "pruned.safetensors"
    if onnx_path.is_file() and zeros.is_file():
        return onnx_path, load_file(str(zeros))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, num_hidden_layers=8, intermediate_size=2816, vocab_size=32000,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=BAR_POSITIONS)
    model = LlamaForCausalLM(cfg).eval()
    pruner = Pruner(model, NM(2, 4))
    apply_masks(model, pruner.stage_masks({ly.name: ly.weight_oi().detach().abs() for ly in pruner.layers}, 1.0))
    model.save_pretrained(cache / "hf", safe_serialization=True)
    export_onnx(cache / "hf", onnx_path)
    pruned = {ly.name: ly.weight_oi().detach().numpy().copy() for ly in pruner.layers}
    save_file(pruned, str(zeros))
    return onnx_path, pruned


def audited(path: Path, pruned: dict) -> str:
    res = audit_onnx(path, pruned)
    return f"{sum(r.holds and r.groups_holding == 1.0 for r in res)}/{len(res)}"


def speed(graphs: dict[str, Path], rounds: int, tokens: int, vocab: int) -> dict:
    targets = {name: OnnxRuntimeTarget(p) for name, p in graphs.items()}
    rng = np.random.default_rng(0)
    prompt, long = rng.integers(0, vocab, (1, 16)), rng.integers(0, vocab, (1, 512))
    for t in targets.values():  # warm-up (prepacking, allocator)
        t.generate(prompt, 4)
        t.logits(long[:, :64])
    dec, pre = {n: [] for n in targets}, {n: [] for n in targets}
    for _ in range(rounds):
        for name, t in targets.items():
            start = time.perf_counter()
            t.generate(prompt, tokens)
            dec[name].append(tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            t.logits(long)
            pre[name].append(1e3 * (time.perf_counter() - start))
    return {n: {"decode_tok_s": statistics.median(dec[n]), "prefill_512_ms": statistics.median(pre[n])} for n in dec}


def plain_dynamic(src: Path, dst: Path) -> Path:
    """The issue's reference: quantize_dynamic, per-channel, every other setting at its default."""
    from onnxruntime.quantization import quantize_dynamic

    from sparsekd_deploy.exporters.quantize import _quiet

    with _quiet():
        quantize_dynamic(str(src), str(dst), per_channel=True)
    return dst


CONTAINER_OPS = ("If", "Loop")  # the query-block rewrite's (exporters/ort_query_blocks.py)


def prefill_profile(graphs: dict[str, Path], vocab: int, top: int = 8) -> None:
    """ORT's own per-op-type kernel times (ms) of one 512-token prefill after a warm-up, side by side."""
    import onnxruntime as ort

    ids = np.random.default_rng(0).integers(0, vocab, (1, 512))
    per = {}
    for name, path in graphs.items():
        so = ort.SessionOptions()
        so.log_severity_level, so.enable_profiling = 3, True
        so.profile_file_prefix = str(path.with_name(f"profile_{path.stem}"))
        target = OnnxRuntimeTarget(path)
        target.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        target.logits(ids)  # warm-up on the same prompt: the same nodes run (prompts of 256+ take the query blocks)
        target.logits(ids)
        trace = Path(target.session.end_profiling())
        ops: dict[str, float] = {}
        kernels = [e for e in json.loads(trace.read_text()) if e.get("cat") == "Node"
                   and e["name"].endswith("_kernel_time")]
        for e in kernels[len(kernels) // 2:]:  # the 512-token run (the warm-up ran the same nodes first)
            ops[e["args"]["op_name"]] = ops.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3
        trace.unlink()
        per[name] = ops
    names = list(per)
    # An If / Loop's time holds its body's kernels, which ORT also lists on their own: counted once, on those rows.
    for ops in per.values():
        for container in CONTAINER_OPS:
            ops.pop(container, None)
    rows = sorted({op for ops in per.values() for op in ops}, key=lambda op: -max(p.get(op, 0) for p in per.values()))
    print(f"\nORT kernel time of one 512-token prefill, ms per op type (top {top})")
    print(f"{'op type':30s}" + "".join(f"{n:>16s}" for n in names))
    for op in rows[:top]:
        print(f"{op:30s}" + "".join(f"{per[n].get(op, 0):16.1f}" for n in names))
    print(f"{'all kernels':30s}" + "".join(f"{sum(per[n].values()):16.1f}" for n in names))


def fused(path: Path) -> tuple[Path, int]:
    """The onnxruntime target's graph: ``path`` with ORT's fused attention (what build / export write for it)."""
    dst = path.with_name(path.stem + ".fused.onnx")
    return dst, fuse_attention(path, dst, max_positions=BAR_POSITIONS).fused


def part1(cache: Path, rounds: int, tokens: int, modes=SPEED_MODES, profile: bool = False) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    src, pruned = bar_model(cache)
    # Each row's ratio is taken against the fp32 graph of its own kind: the onnxruntime target's graphs (attention
    # fused after quantizing) against the fused fp32, the plain graphs (before the fusion) against the plain fp32.
    graphs, info, base_of = {}, {}, {}
    graphs["fp32"], n = fused(src)
    info["fp32"] = {"fused_layers": n}
    calib = calibration_feeds(src, np.random.default_rng(1).integers(0, 32000, (8, 128))) if "int8" in modes else None
    runs = [(m, "onnxruntime") for m in MODES if m in modes] + [("int8", "tensorrt")] * ("int8-trt" in modes)
    for mode, target in runs:
        name = mode if target == "onnxruntime" else "int8 (trt QDQ)"
        dst = quantized_path(src, mode).with_suffix(".trt.onnx" if target == "tensorrt" else ".onnx")
        start = time.perf_counter()
        q = quantize_onnx(src, dst, mode, target=target, calibration=calib if mode == "int8" else None)
        info[name] = {"seconds": time.perf_counter() - start, "audit": audited(dst, pruned), "skipped": q.skipped}
        if target == "onnxruntime":
            plain_q, (dst, info[name]["fused_layers"]) = dst, fused(dst)
            info[name]["audit"] = audited(dst, pruned)
            if mode == "int8-dynamic":
                plain_int8 = plain_q
        graphs[name] = dst
    if "int8-dynamic" in modes:
        graphs["fp32 (plain)"] = src
        ref = plain_dynamic(src, src.with_name("model.plain-dynamic.onnx"))
        same = ref.read_bytes() == plain_int8.read_bytes()
        info["plain dynamic"] = {"audit": audited(ref, pruned), "identical_to_int8_dynamic_before_fusion": same}
        graphs["plain dynamic"] = ref
        base_of["plain dynamic"] = base_of["fp32 (plain)"] = "fp32 (plain)"
        print(f"plain quantize_dynamic(per_channel=True) vs the product's int8-dynamic before the attention fusion: "
              f"{'byte-identical files' if same else 'the files differ'}")
    res = speed(graphs, rounds, tokens, 32000)
    for name, p in graphs.items():
        res[name]["mb"] = p.stat().st_size / 1e6
        res[name].update(info.get(name, {}))
    print(f"\nbar model (Llama 1024 x 8, 2:4, random weights), onnxruntime CPU, {rounds} alternated rounds, medians;"
          " x fp32 against the fp32 graph of the same kind (fused / plain)")
    print(f"{'graph':16s} {'decode tok/s':>12s} {'x fp32':>7s} {'prefill ms':>11s} {'x fp32':>7s} {'MB':>7s} "
          f"{'x fp32':>7s}  2:4 audit  fused attention")
    for name, r in res.items():
        base = res[base_of.get(name, "fp32")]
        print(f"{name:16s} {r['decode_tok_s']:12.1f} {r['decode_tok_s'] / base['decode_tok_s']:7.2f} "
              f"{r['prefill_512_ms']:11.0f} {base['prefill_512_ms'] / r['prefill_512_ms']:7.2f} {r['mb']:7.1f} "
              f"{r['mb'] / base['mb']:7.3f}  {r.get('audit', '-'):9s}  {r.get('fused_layers', 0)} layers")
    if profile and "int8-dynamic" in graphs:
        prefill_profile({"fp32": graphs["fp32"], "int8-dynamic": graphs["int8-dynamic"], "fp32 (plain)": src,
                         "plain dynamic": graphs["plain dynamic"]}, 32000)
    return res


def ort_default_static(src: Path, dst: Path, feeds: list[dict]) -> Path:
    """``quantize_static`` with this tool's int8 settings but ORT's own node choice (the comparison row)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from sparsekd_deploy.exporters.quantize import _Feeds, _quiet, fold_transposed_weights

    model = onnx.load(str(src))
    fold_transposed_weights(model)
    with _quiet():
        quantize_static(model, str(dst), _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul", "Gather"],
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "MatMulConstBOnly": True,
                                       "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
    return dst


def _pre_qat_checkpoint(run: Path) -> Path:
    stages = json.loads((run / "trajectory.json").read_text())["stages"]
    qat = next((r for r in stages if "qat" in r and r["accepted"]), None)
    if qat is None:
        raise SystemExit(f"{run} has no accepted QAT stage (make it with --quantize int8 --qat-steps N)")
    return run / "checkpoints" / f"stage-{qat['stage'] - 1}"


def part2(run: Path, qat_run: Path | None = None) -> dict:
    from safetensors.torch import load_file

    from sparsekd_deploy.models.loading import load_model, resolve_teacher
    from sparsekd_deploy.numerics import kl, log_softmax

    if qat_run is not None:
        run = qat_run
    config = json.loads((run / "state.json").read_text()).get("config", {})
    data = load_file(str(run / "data.safetensors"))
    held, train = data["heldout"], data["train"].numpy()
    teacher = load_model(resolve_teacher(config.get("teacher")))
    with torch.no_grad():
        t_logp = log_softmax(teacher(input_ids=held).logits.double().numpy())
    student = _pre_qat_checkpoint(run) if qat_run is not None else run / "student"
    pruned = pruned_qat = pruned_weights(student, json.loads((run / "sparsity.json").read_text()))
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        export_onnx(student, src)
        graphs = {"fp32": src}
        feeds = calibration_feeds(src, train[:32])
        for mode in MODES:
            graphs[mode] = Path(quantize_onnx(src, quantized_path(src, mode), mode,
                                              calibration=feeds if mode == "int8" else None).path)
            if mode == "int8":
                graphs["int8 (ORT default ops)"] = ort_default_static(src, Path(tmp) / "ort-default.onnx", feeds)
        for mode in TRT_QUALITY_MODES:  # the --target tensorrt graphs, Q/DQ emulated by ORT's CPU provider
            graphs[f"{mode} (trt QDQ)"] = Path(quantize_onnx(src, quantized_path(src, mode).with_suffix(".trt.onnx"),
                                                             mode, target="tensorrt", calibration=feeds).path)
        if qat_run is not None:
            qsrc = Path(tmp) / "qat" / "model.onnx"
            qsrc.parent.mkdir()
            export_onnx(run / "student", qsrc)
            graphs["fp32 after QAT"] = qsrc
            pruned_qat = pruned_weights(run / "student", json.loads((run / "sparsity.json").read_text()))
            # the graph the QAT stage simulated: its mode, for its target (qat_target; older runs: onnxruntime)
            mode, target = config.get("quantize", "int8"), config.get("qat_target", "onnxruntime")
            qat_name = f"{mode}{' (trt QDQ)' if target == 'tensorrt' else ''} + QAT"
            graphs[qat_name] = Path(quantize_onnx(qsrc, quantized_path(qsrc, mode), mode, target=target,
                                                  calibration=calibration_feeds(qsrc, train[:32])).path)
        for name, p in graphs.items():
            logits = OnnxRuntimeTarget(p).logits(held.numpy())
            s_logp = log_softmax(logits.astype(np.float64))
            res[name] = {"kl_full": float(kl(t_logp, s_logp).mean()),
                         "top1": float((s_logp.argmax(-1) == t_logp.argmax(-1)).mean()),
                         "mb": p.stat().st_size / 1e6, "audit": audited(p, pruned_qat if "QAT" in name else pruned)}
    if qat_run is not None:  # the QAT stage's own record: its fake-quantized KL at the start and at the end
        stage = next(r for r in json.loads((run / "trajectory.json").read_text())["stages"] if "qat" in r)
        res["qat stage"] = {"target": stage["qat"].get("target", "onnxruntime"), "mode": stage["qat"]["mode"],
                            "kl_fake_quant_start": stage["kl_after_prune"], "kl_fake_quant_end": stage["kl"],
                            "kl_float_before": stage["qat"]["kl_float_before"],
                            "kl_float_after": stage["qat"].get("kl_float_after")}
        print(f"\nQAT stage ({stage['qat']['mode']}, {res['qat stage']['target']}): fake-quantized KL at its start "
              f"{stage['kl_after_prune']:.4f}, after {stage['steps']} steps {stage['kl']:.4f} (float student "
              f"{stage['qat']['kl_float_before']:.4f} before)")
    base = res["fp32"]
    print(f"\n{run} student vs its teacher on the run's {held.shape[0]} x {held.shape[1]} held-out tokens "
          "(static int8 / fp8 calibrated on 32 training sequences; the trt QDQ rows run on ORT's CPU provider, which "
          "emulates their Q/DQ)")
    print(f"{'graph':24s} {'full KL':>9s} {'x fp32':>7s} {'top-1':>7s} {'- fp32':>7s} {'MB':>6s}  2:4 audit")
    for name, r in res.items():
        if "kl_full" not in r:
            continue
        print(f"{name:24s} {r['kl_full']:9.4f} {r['kl_full'] / base['kl_full']:7.2f} {r['top1']:7.3f} "
              f"{r['top1'] - base['top1']:+7.3f} {r['mb']:6.1f}  {r['audit']}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("dist/demo.run"), help="distillation run dir (student/, data)")
    ap.add_argument("--qat-run", type=Path, help="a run made with --quantize int8 --qat-steps N (replaces --run)")
    ap.add_argument("--cache", type=Path, default=Path("runs/bench_quantize"), help="where the bar model is kept")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--modes", default=",".join(SPEED_MODES), help="speed part: which quantized graphs")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--profile", action="store_true", help="speed part: per-op prefill kernel times, fp32 vs int8")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = {}
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = [m for m in modes if m not in SPEED_MODES]
    if unknown:
        ap.error(f"unknown --modes {', '.join(unknown)}; choose from {', '.join(SPEED_MODES)}")
    if not args.skip_speed:
        out["bar_model"] = part1(args.cache, args.rounds, args.tokens, modes, args.profile)
    if not args.skip_quality:
        out["demo"] = part2(args.run, args.qat_run)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
