"""Add an engine that ``trtexec`` built on the device to the bundle (``sparsekd-deploy engine add``).

The trtexec line in ``engine_build.json`` builds ``engine.plan`` outside this tool; this module gives that plan
the same manifest record the Python builder writes, so ``validate --runtime tensorrt`` and the compatibility
checks work the same. Facts come from the plan header (TensorRT version), the trtexec log (version, GPU,
compute capability, precision, sparsity lines) and the ``--exportLayerInfo`` JSON (per-layer tactics); where
they disagree, the engine is refused. Runs without TensorRT: nothing is deserialised here.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..exporters.engine_step import STEP_FILE
from ..exporters.trt_compat import EngineMismatchError, read_plan_header, this_machine, version_tuple
from ..exporters.trt_logs import (
    LayerInfoError,
    SparsityLog,
    log_says_engine_built,
    parse_inspector,
    parse_sparsity,
    parse_trtexec_build,
    sparsity_report,
)
from ..exporters.trt_profiles import Profile

ENGINE_FILES = ("engine.plan", "engine.sparsity.json", "engine.build.log", "engine.layers.json")


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ConfigError([f"{what} {path} does not exist"])
    return path.read_text(errors="replace")


def _log_profile(shapes: dict) -> Profile | None:
    """The profile of the log's --min/opt/maxShapes; shapes that are not this tool's decoder inputs are refused."""
    try:
        return Profile.from_trtexec_shapes(shapes)
    except (KeyError, IndexError, TypeError) as e:
        given = "; ".join(f"--{w}Shapes=" + ",".join(f"{n}:{'x'.join(map(str, d))}" for n, d in shapes[w].items())
                          for w in ("min", "opt", "max"))
        raise ConfigError([
            f"the trtexec log's shapes do not fit this bundle's graph ({given}; {type(e).__name__}: {e}): "
            "input_ids must be BATCHxSEQ and every past_key_values.* BATCHxHEADSxPASTxDIM in all three; "
            "rebuild with the line from engine_build.json"]) from None


def engine_record(plan: Path, log_text: str | None, step: dict, *, compute_capability: str | None = None,
                  device_name: str | None = None) -> dict:
    """The manifest's engine record for a plan built by trtexec. Pure: no files written."""
    header = read_plan_header(plan)
    info = parse_trtexec_build(log_text) if log_text else {}
    version = header.version_str or info.get("tensorrt_version")
    if header.version_str and info.get("tensorrt_version") and \
            version_tuple(header.version_str) != version_tuple(info["tensorrt_version"]):
        raise EngineMismatchError(f"{plan.name} header says TensorRT {header.version_str}, the log says "
                                  f"{info['tensorrt_version']}: this log belongs to another build")
    if not version:
        raise ConfigError([f"cannot tell which TensorRT built {plan.name} (no version in its header): "
                           "pass --log with the trtexec output"])
    if header.trt_version is None and not log_says_engine_built(log_text or ""):
        # A banner and option lines say which TensorRT ran, not that this file is what it wrote.
        raise EngineMismatchError(
            f"{plan} does not look like a TensorRT plan: its header carries no TensorRT version (bytes 24–26) and "
            "the log has no line saying an engine was built ('Engine built in …', 'Engine generation completed', "
            "'Adding N engine(s) to plan file'). Pass the file trtexec wrote with --saveEngine and its full log")
    if compute_capability and not re.fullmatch(r"\d+\.\d+", compute_capability):
        raise ConfigError([f"--compute-capability must look like 8.7 (major.minor), got {compute_capability!r}"])
    if compute_capability and info.get("compute_capability") and compute_capability != info["compute_capability"]:
        raise EngineMismatchError(f"--compute-capability {compute_capability} but the log says the engine was built "
                                  f"on {info['compute_capability']} ({info.get('device_name', '?')})")
    here = this_machine()
    from_here = not (compute_capability or info.get("compute_capability"))  # registering on the device itself
    cc = compute_capability or info.get("compute_capability") or here["compute_capability"]
    if not cc:
        raise ConfigError(["cannot tell which GPU built the engine: pass --log with the trtexec output, or "
                           "--compute-capability (e.g. 8.7 for Jetson Orin, 9.0 for H100)"])
    profile = _log_profile(info["shapes"]) if "shapes" in info else None
    major = version_tuple(version)[0]
    strongly_typed = major >= 11 or info.get("strongly_typed", False)
    quantized = step.get("quantized_onnx")  # the bundle's Q/DQ graph, when the step builds from it
    if strongly_typed:
        # The graph's dtypes are the precision (the log's "Precision:" line does not say it): which graph was built?
        onnx = info.get("onnx") or quantized or ("model.fp16.onnx" if step.get("fp16", True) else "model.onnx")
        fp16 = onnx.endswith(".fp16.onnx")
    else:
        onnx = info.get("onnx") or quantized or "model.onnx"
        fp16 = info["precision"] == "fp16" if "precision" in info else bool(step.get("fp16", True))
    # A Q/DQ graph's precision is its quantization (the scales are in the graph), whatever the float layers run in.
    precision = step["precision"] if quantized and onnx == quantized else ("fp16" if fp16 else "fp32")
    return {
        "plan": "engine.plan", "tensorrt_version": version, "compute_capability": cc,
        "device_name": device_name or info.get("device_name") or here["device_name"],
        "cuda_version": here["cuda_version"] if from_here else None,
        "hardware_compatibility": "none", "version_compatible": False,
        "precision": precision, "strongly_typed": strongly_typed,
        "sparse_weights": info.get("sparse_weights", bool(step.get("sparse_weights", True))),
        "onnx": onnx,
        # The shapes trtexec really ran with (a user may edit the line); else the ones the line was written with.
        "profile": profile.to_dict() if profile else step.get("profile"), "workspace_mib": step.get("workspace_mib"),
        "built_with": "trtexec",
    }


def _read_step(bundle) -> dict:
    """The bundle's engine_build.json (the on-device step), or {} when it has none."""
    return bundle.read_json(STEP_FILE, "engine step", "rebuild the bundle with `build --target tensorrt`") or {}


def register_engine(bundle, plan: Path, *, log: Path | None = None, layers: Path | None = None,
                    compute_capability: str | None = None, device_name: str | None = None) -> tuple[dict, dict]:
    """Copy the plan (and its log / layer JSON) into the bundle with a manifest record and a sparsity report."""
    plan = Path(plan)
    if not plan.is_file():
        raise ConfigError([f"engine plan {plan} does not exist"])
    log_text = _read_text(Path(log), "log") if log else None
    layer_text = _read_text(Path(layers), "layer info") if layers else None
    step = _read_step(bundle)
    record = engine_record(plan, log_text, step, compute_capability=compute_capability, device_name=device_name)
    if not bundle.has(record["onnx"]):
        raise ConfigError([f"the log says trtexec built {record['onnx']}, which is not a graph of this bundle "
                           f"({', '.join(n for n in bundle.manifest['files'] if n.endswith('.onnx'))}): "
                           "this engine belongs to another model"])

    try:
        inspector = parse_inspector(layer_text) if layer_text else None
    except json.JSONDecodeError as e:
        raise ConfigError([f"layer info {layers} is not JSON ({e.msg} at line {e.lineno}): pass the file "
                           "trtexec wrote with --exportLayerInfo"]) from None
    except LayerInfoError as e:
        raise ConfigError([f"layer info {layers} {e}: pass the file trtexec wrote with --exportLayerInfo"]) from None
    report = sparsity_report(parse_sparsity(log_text) if log_text else SparsityLog(), inspector)
    if not log_text:
        report["summary"] = "no build log given: eligible layers unknown" + (
            f"; {len(report['layers_with_sparse_tactic'])} layer(s) run a sparse tactic (layer info)" if inspector else "")
    report["sparse_weights_flag"] = record["sparse_weights"]
    record["sparsity_summary"] = report["summary"]

    with tempfile.TemporaryDirectory(dir=bundle.path) as tmp:
        staged = {"engine.plan": Path(tmp) / "engine.plan", "engine.sparsity.json": Path(tmp) / "engine.sparsity.json"}
        shutil.copyfile(plan, staged["engine.plan"])
        staged["engine.sparsity.json"].write_text(json.dumps(report, indent=2))
        if log_text is not None:
            staged["engine.build.log"] = Path(tmp) / "engine.build.log"
            staged["engine.build.log"].write_text(log_text)
        if layer_text is not None:
            staged["engine.layers.json"] = Path(tmp) / "engine.layers.json"
            staged["engine.layers.json"].write_text(layer_text)
        # Reports of an engine this one replaces must not outlive it.
        stale = [n for n in ENGINE_FILES if n not in staged]
        bundle.add_files(staged, {"engine": record}, drop=stale)
    return record, report
