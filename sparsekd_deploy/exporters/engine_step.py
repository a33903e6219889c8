"""The engine-build step for the device: where a bundle is made without TensorRT or a GPU, it carries the exact
trtexec command and the equivalent ``sparsekd-deploy engine build`` call. No engine is faked."""

from __future__ import annotations

import json
from pathlib import Path

from .trt_precision import bundle_precision
from .trt_profiles import Profile, shell_line, trtexec_argv

STEP_FILE = "engine_build.json"


def graph_inputs(onnx_path: Path) -> dict[str, list]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def write_device_step(bundle_dir: Path, profile: Profile, *, fp16: bool, sparse: bool, workspace_mib: int,
                      quantization: dict | None = None) -> dict:
    """``quantization``: the manifest's record of the bundle's quantized graph (mode, file); when its mode is one
    TensorRT builds (int8, fp8, int4-weight), the engine is built from that Q/DQ graph, and the lines say so."""
    onnx32 = bundle_dir / "model.onnx"
    shapes = profile.shapes(graph_inputs(onnx32))
    common = dict(shapes=shapes, sparse=sparse, workspace_mib=workspace_mib,
                  timing_cache="timing.cache", layer_info="engine.layers.json")
    quantized = bundle_precision(quantization)
    if quantized:
        graph = quantization["file"]
        v10 = trtexec_argv(graph, "engine.plan", trt_major=10, fp16=fp16, precision=quantized, **common)
        v11 = trtexec_argv(graph, "engine.plan", trt_major=11, fp16=fp16, precision=quantized, **common)
    else:
        v10 = trtexec_argv("model.onnx", "engine.plan", trt_major=10, fp16=fp16, **common)
        v11 = trtexec_argv("model.fp16.onnx" if fp16 else "model.onnx", "engine.plan", trt_major=11, fp16=fp16,
                           **common)
    python = ["sparsekd-deploy", "engine", "build", "<BUNDLE>", "--batch", _r(profile.batch), "--seq", _r(profile.seq),
              "--past", _r(profile.past), "--workspace", str(workspace_mib)] + ([] if fp16 else ["--fp32"]) + \
             ([] if sparse else ["--dense"]) + (["--precision", quantized] if quantized else [])
    # After trtexec (run in the bundle dir, output saved to trtexec.log), this adds the plan to the manifest.
    register = ["sparsekd-deploy", "engine", "add", "<BUNDLE>", "--plan", "engine.plan", "--log", "trtexec.log",
                "--layers", "engine.layers.json"]
    step = {
        "note": "TensorRT engines are tied to the TensorRT version and GPU that build them: build on the device. "
                "Either run python_builder, or in the bundle dir run a trtexec line with its output saved to "
                "trtexec.log, then trtexec_register.",
        "python_builder": python, "python_builder_line": shell_line(python),
        "trtexec_tensorrt10": v10, "trtexec_tensorrt10_line": shell_line(v10),
        "trtexec_tensorrt11": v11, "trtexec_tensorrt11_line": shell_line(v11),
        "trtexec_register": register, "trtexec_register_line": shell_line(register),
        "profile": profile.to_dict(), "fp16": fp16, "sparse_weights": sparse, "workspace_mib": workspace_mib,
        "precision": quantized or ("fp16" if fp16 else "fp32"),
    }
    if quantized:
        step["quantized_onnx"] = quantization["file"]
        step["note"] += (f" The engine is built from the {quantized} Q/DQ graph {quantization['file']} (explicit "
                         "quantization: the scales are in the graph, no calibrator)"
                         + ("; FP8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper) and TensorRT 10 or "
                            "newer" if quantized == "fp8" else "") + ".")
    (bundle_dir / STEP_FILE).write_text(json.dumps(step, indent=2) + "\n")
    return step


def _r(r) -> str:
    return f"{r.min},{r.opt},{r.max}"
