"""Build a TensorRT engine for this GPU and add it, with its reports, to a bundle (``engine build`` and ``build``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..bundle import Bundle

ENGINE_FILES = ("engine.plan", "engine.layers.json", "engine.sparsity.json", "engine.build.log")


def build_into_bundle(b: Bundle, profile, *, fp16: bool, sparse: bool, workspace_mib: int, precision: str | None = None):
    """Build engine.plan for this GPU and add it (with its reports) to the bundle's manifest. ``precision`` None:
    a --target tensorrt bundle's quantized Q/DQ graph when it has one (int8, fp8, int4-weight), else fp16 / fp32."""
    from ..exporters.tensorrt import build_engine
    from ..exporters.trt_precision import bundle_precision
    from ..exporters.trt_profiles import Profile

    profile = profile or Profile.from_cli(None, None, None, b.manifest["model"].get("max_positions"))
    fp16_rel = b.manifest["model"].get("onnx_fp16")
    q = b.manifest.get("quantization") if isinstance(b.manifest.get("quantization"), dict) else None
    target = b.manifest.get("target") if isinstance(b.manifest.get("target"), dict) else {}
    # Only a --target tensorrt bundle's quantized graph is made for TensorRT (Q/DQ, zero point 0) by default.
    precision = precision or (bundle_precision(q) if target.get("runtime") == "tensorrt" else None)
    q_rel = q.get("file") if q and precision == q.get("mode") else None
    with tempfile.TemporaryDirectory(dir=b.path) as tmp:
        res = build_engine(b.model_path, b.file(fp16_rel) if fp16_rel else None, Path(tmp), profile,
                           fp16=fp16, sparse=sparse, workspace_mib=workspace_mib, cache_dir=b.path.parent,
                           precision=precision, onnx_quantized=b.file(q_rel) if q_rel else None)
        b.add_files({n: Path(tmp) / n for n in ENGINE_FILES}, {"engine": res.engine})
    return res
