"""The engine-build step for the device: where a bundle is made without TensorRT or a GPU, it carries the exact
trtexec command and the equivalent ``sparsekd-deploy engine build`` call. No engine is faked."""

from __future__ import annotations

import json
from pathlib import Path

from .trt_profiles import Profile, shell_line, trtexec_argv

STEP_FILE = "engine_build.json"


def graph_inputs(onnx_path: Path) -> dict[str, list]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def write_device_step(bundle_dir: Path, profile: Profile, *, fp16: bool, sparse: bool, workspace_mib: int) -> dict:
    onnx32 = bundle_dir / "model.onnx"
    shapes = profile.shapes(graph_inputs(onnx32))
    common = dict(shapes=shapes, sparse=sparse, workspace_mib=workspace_mib,
                  timing_cache="timing.cache", layer_info="engine.layers.json")
    v10 = trtexec_argv("model.onnx", "engine.plan", trt_major=10, fp16=fp16, **common)
    v11 = trtexec_argv("model.fp16.onnx" if fp16 else "model.onnx", "engine.plan", trt_major=11, fp16=fp16, **common)
    python = ["sparsekd-deploy", "engine", "build", "<BUNDLE>", "--batch", _r(profile.batch), "--seq", _r(profile.seq),
              "--past", _r(profile.past), "--workspace", str(workspace_mib)] + ([] if fp16 else ["--fp32"]) + \
             ([] if sparse else ["--dense"])
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
    }
    (bundle_dir / STEP_FILE).write_text(json.dumps(step, indent=2) + "\n")
    return step


def _r(r) -> str:
    return f"{r.min},{r.opt},{r.max}"
