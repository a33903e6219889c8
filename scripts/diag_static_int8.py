"""Where static INT8's error comes from on a distillation run's student: ``quantize_static`` (QDQ, per-channel int8
weights, uint8 activations, minmax) with one setting changed at a time, each graph scored against the teacher on the
run's held-out sequences (full-vocabulary KL, top-1), side by side in one run. The numbers behind the node choice of
``exporters/quantize.py`` (README, Quantization).

    .venv/bin/python scripts/diag_static_int8.py [--run dist/demo.run]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from safetensors.torch import load_file

from sparsekd_deploy.exporters.onnx import export_onnx
from sparsekd_deploy.exporters.quantize import _Feeds, _quiet, fold_transposed_weights
from sparsekd_deploy.models.loading import load_model, resolve_teacher
from sparsekd_deploy.numerics import kl, log_softmax
from sparsekd_deploy.pipeline.export_step import calibration_feeds
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("dist/demo.run"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    run = args.run
    data = load_file(str(run / "data.safetensors"))
    held, train = data["heldout"], data["train"].numpy()
    teacher = load_model(resolve_teacher(json.loads((run / "state.json").read_text())["config"].get("teacher")))
    with torch.no_grad():
        t_logp = log_softmax(teacher(input_ids=held).logits.double().numpy())

    def score(path: Path) -> tuple[float, float]:
        s = log_softmax(OnnxRuntimeTarget(path).logits(held.numpy()).astype(np.float64))
        return float(kl(t_logp, s).mean()), float((s.argmax(-1) == t_logp.argmax(-1)).mean())

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        export_onnx(run / "student", src)
        base = onnx.load(str(src))
        fold_transposed_weights(base)
        inits = {i.name for i in base.graph.initializer}
        weighted = [n.name for n in base.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        emb = [n.name for n in base.graph.node if n.op_type == "Gather" and n.input[0] in inits]
        head = [n for n in weighted if not n.startswith("/model/layers")]
        rotary = [n.name for n in base.graph.node if n.op_type == "MatMul" and "rotary" in n.name]
        attn = [n.name for n in base.graph.node if n.op_type == "MatMul" and "self_attn/MatMul" in n.name]
        feeds = {k: calibration_feeds(src, train[:k]) for k in (8, 32, 128)}
        fix = dict(nodes=weighted + emb, outputs=False)
        variants = {
            "ORT defaults (every MatMul, outputs too)": {},
            "weight-bearing nodes only": dict(nodes=weighted + emb),
            "... and no output Q/DQ (this tool)": fix,
            "this tool, lm_head left float": {**fix, "nodes": [n for n in weighted if n not in head] + emb},
            "this tool, per-tensor weights": {**fix, "per_channel": False},
            "this tool, reduce_range": {**fix, "reduce_range": True},
            "this tool, calibrated on 8 sequences": {**fix, "calib": 8},
            "this tool, calibrated on 128 sequences": {**fix, "calib": 128},
            "this tool + the rotary MatMul": {**fix, "nodes": weighted + emb + rotary},
            "this tool + the attention MatMuls": {**fix, "nodes": weighted + emb + attn},
        }
        fp = score(src)
        print(f"{run} student vs teacher, {held.shape[0]} x {held.shape[1]} held-out tokens")
        print(f"{'graph':44s} {'full KL':>8s} {'x fp32':>7s} {'top-1':>6s} {'- fp32':>7s}")
        print(f"{'fp32':44s} {fp[0]:8.4f} {1:7.2f} {fp[1]:6.3f}")
        for i, (name, v) in enumerate(variants.items()):
            dst = Path(tmp) / f"v{i}.onnx"
            model = onnx.ModelProto()
            model.CopyFrom(base)
            extra = {"WeightSymmetric": True, "ActivationSymmetric": False, "MatMulConstBOnly": True,
                     "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
            if v.get("outputs", True) is False:
                extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gather"]
            with _quiet():
                quantize_static(model, str(dst), _Feeds(feeds[v.get("calib", 32)]), quant_format=QuantFormat.QDQ,
                                per_channel=v.get("per_channel", True), reduce_range=v.get("reduce_range", False),
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul", "Gather"],
                                nodes_to_quantize=v.get("nodes"), extra_options=extra)
            k, t1 = score(dst)
            print(f"{name:44s} {k:8.4f} {k / fp[0]:7.2f} {t1:6.3f} {t1 - fp[1]:+7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
