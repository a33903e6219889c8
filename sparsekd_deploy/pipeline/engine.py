"""Build a TensorRT engine for this GPU and add it, with its reports, to a bundle (``engine build`` and ``build``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..bundle import Bundle

ENGINE_FILES = ("engine.plan", "engine.layers.json", "engine.sparsity.json", "engine.build.log")


def build_into_bundle(b: Bundle, profile, *, fp16: bool, sparse: bool, workspace_mib: int):
    """Build engine.plan for this GPU and add it (with its reports) to the bundle's manifest."""
    from ..exporters.tensorrt import build_engine
    from ..exporters.trt_profiles import Profile

    profile = profile or Profile.from_cli(None, None, None, b.manifest["model"].get("max_positions"))
    fp16_rel = b.manifest["model"].get("onnx_fp16")
    with tempfile.TemporaryDirectory(dir=b.path) as tmp:
        res = build_engine(b.model_path, b.file(fp16_rel) if fp16_rel else None, Path(tmp), profile,
                           fp16=fp16, sparse=sparse, workspace_mib=workspace_mib, cache_dir=b.path.parent)
        b.add_files({n: Path(tmp) / n for n in ENGINE_FILES}, {"engine": res.engine})
    return res
