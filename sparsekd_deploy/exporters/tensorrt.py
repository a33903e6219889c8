"""TensorRT engine builder on TensorRT's Python API (10.x and 11.x, detected at run time).

- FP16: TensorRT 10.x sets ``BuilderFlag.FP16`` on the FP32 graph (the flag is deprecated since 10.12 but still
  honoured); TensorRT 11 removed the precision flags — networks are strongly typed, so it parses the FP16 graph.
- INT8 / FP8 / INT4 weights: built from the bundle's Q/DQ graph (explicit quantization, no calibrator) with the
  flags ``trt_precision`` chooses per version; FP8 is refused on a GPU or TensorRT without it.
- ``BuilderFlag.SPARSE_WEIGHTS`` lets TensorRT *time* sparse tactics; it keeps them only where they are faster.
  Compute capability < 8.0 has no sparse tensor cores: warn, build dense, say so.
- The log is captured at VERBOSE (10.x prints its sparsity lines only there) and the engine inspector runs at
  DETAILED profiling verbosity, so the sparsity report can say which layers really picked a sparse tactic.
- A timing cache keyed by device (name + compute capability + TensorRT version) makes rebuilds fast.

Everything that needs no GPU (log parsing, profiles, command lines, compatibility) lives in the sibling
modules and is tested on CPU; this module runs where TensorRT and a GPU exist (tests marked ``tensorrt``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SparseKDError
from .trt_compat import sparse_tensor_cores, this_machine
from .trt_logs import parse_inspector, parse_parser_errors, parse_sparsity, sparsity_report
from .trt_precision import QUANTIZED, EnginePrecisionError, check_device, check_for_tensorrt, check_ort_contrib, choose
from .trt_profiles import Profile


class TensorRTUnavailableError(SparseKDError):
    pass


class EngineBuildError(SparseKDError):
    exit_code = 1


BUILD_HINT = "the engine is built on the device: copy the bundle there and run `sparsekd-deploy engine build BUNDLE`"
RUN_HINT = "an engine runs only where it was built: validate on that device (`sparsekd-deploy validate BUNDLE --runtime tensorrt`)"


def import_tensorrt(hint: str = BUILD_HINT):
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed here (pip install tensorrt, or use the JetPack one on Jetson); {hint}"
        ) from None
    return trt


def list_logger(trt, lines: list[str]):
    """A TensorRT logger that keeps every message (VERBOSE included) in ``lines``, tagged like TensorRT's own."""

    class ListLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            tag = {trt.ILogger.VERBOSE: "V", trt.ILogger.INFO: "I", trt.ILogger.WARNING: "W"}.get(severity, "E")
            lines.append(f"[TRT] [{tag}] {msg}")

    return ListLogger()


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


@dataclass
class EngineBuildResult:
    plan: Path
    engine: dict  # manifest record: versions, device, flags, profile
    sparsity: dict
    warnings: list[str] = field(default_factory=list)


def _timing_cache_name(device: dict) -> str:
    key = f"{device.get('device_name')}-sm{device.get('compute_capability')}-trt{device.get('tensorrt_version')}"
    return "timing-" + re.sub(r"[^A-Za-z0-9.]+", "_", key) + ".cache"


def _builder_flag(trt, name: str):
    """``trt.BuilderFlag.<name>``, spelled out (not getattr) so scripts/check_trt_api.py checks every name against the
    real bindings; ``trt_precision.choose`` asks for the precision flags on TensorRT 10.x only (11 has none)."""
    if name == "SPARSE_WEIGHTS":
        return trt.BuilderFlag.SPARSE_WEIGHTS
    if name == "FP16":
        return trt.BuilderFlag.FP16
    if name == "INT8":
        return trt.BuilderFlag.INT8
    if name == "FP8":
        return trt.BuilderFlag.FP8
    if name == "INT4":
        return trt.BuilderFlag.INT4
    raise EngineBuildError(f"no TensorRT builder flag {name!r}")


def build_engine(onnx_fp32: Path, onnx_fp16: Path | None, out_dir: Path, profile: Profile, *, fp16: bool = True,
                 sparse: bool = True, workspace_mib: int = 4096, cache_dir: Path | None = None,
                 precision: str | None = None, onnx_quantized: Path | None = None) -> EngineBuildResult:
    """``precision``: fp16 / fp32 (default, per ``fp16``) or a quantized one (int8, fp8, int4-weight) built from
    ``onnx_quantized``, the bundle's Q/DQ graph (explicit quantization: no calibrator). The graph, typing and
    flags per TensorRT version come from ``trt_precision.choose``."""
    trt = import_tensorrt()
    device = this_machine()
    if not device["compute_capability"]:
        raise TensorRTUnavailableError("no CUDA GPU visible: a TensorRT engine can only be built on the GPU it runs on")
    precision = precision or ("fp16" if fp16 else "fp32")
    check_device(precision, trt.__version__, device["compute_capability"])
    warnings = []
    if sparse and not sparse_tensor_cores(device["compute_capability"]):
        warnings.append(f"compute capability {device['compute_capability']} has no sparse tensor cores "
                        "(needs ≥ 8.0, Ampere): building a dense engine")
        sparse = False
    major = trt_major(trt)
    graphs = {str(p): p for p in (onnx_fp32, onnx_fp16, onnx_quantized) if p is not None}
    try:
        chosen = choose(precision, trt_major=major, sparse=sparse, fp16_graph=str(onnx_fp16) if onnx_fp16 else None,
                        quantized_graph=str(onnx_quantized) if onnx_quantized else None, fp32_graph=str(onnx_fp32))
    except EnginePrecisionError as e:
        raise EngineBuildError(str(e)) from None
    onnx_path = graphs[chosen.onnx]
    check_ort_contrib(onnx_path)  # an onnxruntime bundle's fp32 graph carries ORT's fused attention
    if precision in QUANTIZED:
        check_for_tensorrt(onnx_path)
    lines: list[str] = []
    logger = list_logger(trt, lines)
    builder = trt.Builder(logger)
    # TensorRT 11 networks are always strongly typed (flag 0 means that there); 10.x builds weakly typed with flags.
    network = builder.create_network(0)  # explicit batch is the only mode since 10.0
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        summary = parse_parser_errors("\n".join(lines + errors)) or errors[:3]
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: " + "; ".join(summary))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in chosen.flags:  # FP16 / INT8 / FP8 / INT4 (10.x only) and SPARSE_WEIGHTS
        config.set_flag(_builder_flag(trt, flag))
    inputs = {network.get_input(i).name: list(network.get_input(i).shape) for i in range(network.num_inputs)}
    opt = builder.create_optimization_profile()
    for name, (mn, op, mx) in profile.shapes(inputs).items():
        opt.set_shape(name, mn, op, mx)
    config.add_optimization_profile(opt)

    cache_dir = cache_dir or out_dir
    cache_file = Path(cache_dir) / _timing_cache_name(device)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        tail = [ln for ln in lines if "[E]" in ln][-3:]
        raise EngineBuildError("TensorRT failed to build the engine: " + (" | ".join(tail) or "see the build log"))
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / "engine.plan"
    tmp = plan_path.with_name("engine.plan.tmp")
    tmp.write_bytes(bytes(plan))
    tmp.replace(plan_path)
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    (out_dir / "engine.build.log").write_text("\n".join(lines) + "\n")

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(plan))
    inspector = engine.create_engine_inspector()
    layer_json = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    (out_dir / "engine.layers.json").write_text(layer_json)
    report = sparsity_report(parse_sparsity("\n".join(lines)), parse_inspector(layer_json))
    report["sparse_weights_flag"] = sparse
    (out_dir / "engine.sparsity.json").write_text(json.dumps(report, indent=2))
    record = {
        "plan": "engine.plan", "tensorrt_version": trt.__version__, "compute_capability": device["compute_capability"],
        "device_name": device["device_name"], "cuda_version": device["cuda_version"],
        "hardware_compatibility": "none", "version_compatible": False,
        "precision": precision, "strongly_typed": chosen.strongly_typed, "sparse_weights": sparse,
        "builder_flags": list(chosen.flags), "onnx": onnx_path.name, "profile": profile.to_dict(), "workspace_mib": workspace_mib,
        "sparsity_summary": report["summary"], "warnings": warnings,
    }
    return EngineBuildResult(plan_path, record, report, warnings)
