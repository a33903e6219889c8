"""Which graph a TensorRT engine is built from, in which precision, with which builder flags — per TensorRT major
version. Pure logic (no TensorRT import): the Python builder and the trtexec lines of ``engine_build.json`` both
take their choice from here, and it is tested on CPU.

A quantized bundle graph (``--quantize int8 | fp8 | int4-weight`` with ``--target tensorrt``) carries explicit
quantization: QuantizeLinear/DequantizeLinear nodes with their scales, so TensorRT needs no calibrator.

- TensorRT 10 (weakly typed by default): the Q/DQ nodes fix where INT8/FP8/INT4 is used, but the builder may use
  a precision only when its flag is set (``BuilderFlag.INT8`` / ``FP8`` / ``INT4``; trtexec ``--int8`` / ``--fp8``
  / ``--int4``), plus ``FP16`` for the layers the graph leaves in float (the QDQ graph is FP32) and
  ``SPARSE_WEIGHTS`` (``--sparsity=enable``) so the 2:4 weights may take sparse INT8 tactics.
- TensorRT 11: every network is strongly typed and the precision flags are gone: the Q/DQ graph's own types are
  the precision (``--stronglyTyped``); the unquantized layers run in the graph's FP32. ``SPARSE_WEIGHTS`` stays.
- ``int8-dynamic`` is ONNX Runtime's MatMulInteger form, not Q/DQ: TensorRT has no dynamic quantization.
- FP8 needs FP8 tensor cores (compute capability 8.9: Ada; 9.0: Hopper; and later) and TensorRT 10 or newer.
- TensorRT takes symmetric quantization only (zero point 0): a graph quantized for ONNX Runtime's CPU provider
  (uint8 activations with zero points) is refused, naming the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SparseKDError
from .onnx import ORT_DOMAIN, all_nodes

# quantization mode -> (TensorRT 10 BuilderFlag name, trtexec switch)
QUANTIZED = {"int8": ("INT8", "--int8"), "fp8": ("FP8", "--fp8"), "int4-weight": ("INT4", "--int4")}
ENGINE_PRECISIONS = ("fp16", "fp32", *QUANTIZED)
# The onnxruntime target's quantized forms (QOperator): TensorRT parses Q/DQ only.
ORT_ONLY_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits", "GatherBlockQuantized",
                "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
FP8_MIN_CC = (8, 9)
FP8_MIN_TRT = 10


class EnginePrecisionError(SparseKDError):
    pass


@dataclass(frozen=True)
class EnginePrecision:
    precision: str  # fp16 | fp32 | int8 | fp8 | int4-weight
    onnx: str  # the bundle graph TensorRT parses
    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag names to set, in order
    trtexec: tuple[str, ...]  # the matching trtexec switches

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flags"], d["trtexec"] = list(self.flags), list(self.trtexec)
        return d


def bundle_precision(quantization: dict | None) -> str | None:
    """The quantized precision an engine of this bundle defaults to (its QDQ graph), or None (build FP16/FP32)."""
    mode = (quantization or {}).get("mode")
    return mode if mode in QUANTIZED and isinstance((quantization or {}).get("file"), str) else None


def choose(precision: str, *, trt_major: int, sparse: bool, fp16_graph: str | None = None,
           quantized_graph: str | None = None, fp32_graph: str = "model.onnx") -> EnginePrecision:
    """The graph, typing and flags for an engine of ``precision`` on TensorRT ``trt_major``. ``fp16_graph`` /
    ``quantized_graph``: the bundle's files for them (None: it has none)."""
    if precision == "int8-dynamic":
        raise EnginePrecisionError("int8-dynamic is ONNX Runtime's dynamic quantization (MatMulInteger), which "
                                   "TensorRT cannot build; rebuild the bundle with --target tensorrt --quantize int8 "
                                   "(static Q/DQ) or build the engine in fp16")
    if precision not in ENGINE_PRECISIONS:
        raise EnginePrecisionError(f"unknown engine precision {precision!r}; choose from {', '.join(ENGINE_PRECISIONS)}")
    sparse_flag = ("SPARSE_WEIGHTS",) if sparse else ()
    sparse_switch = ("--sparsity=enable",) if sparse else ()
    if precision in QUANTIZED:
        if not quantized_graph:
            raise EnginePrecisionError(f"the bundle has no {precision} graph to build a {precision} engine from; "
                                       f"rebuild it with --target tensorrt --quantize {precision}")
        flag, switch = QUANTIZED[precision]
        if trt_major >= 11:
            return EnginePrecision(precision, quantized_graph, True, sparse_flag, ("--stronglyTyped", *sparse_switch))
        return EnginePrecision(precision, quantized_graph, False, ("FP16", flag, *sparse_flag),
                               ("--fp16", switch, *sparse_switch))
    if trt_major >= 11:  # strongly typed: FP16 needs the FP16 graph
        if precision == "fp16" and not fp16_graph:
            raise EnginePrecisionError("TensorRT 11 builds FP16 only from an FP16 ONNX graph; the bundle has none")
        graph = fp16_graph if precision == "fp16" else fp32_graph
        return EnginePrecision(precision, graph, True, sparse_flag, ("--stronglyTyped", *sparse_switch))
    fp16 = precision == "fp16"
    return EnginePrecision(precision, fp32_graph, False, ("FP16",) * fp16 + sparse_flag,
                           ("--fp16",) * fp16 + sparse_switch)


def check_device(precision: str, trt_version: str | None, compute_capability: str | None) -> None:
    """Refuse, before any build, a precision this TensorRT or GPU cannot run (today: FP8), naming both sides."""
    if precision != "fp8":
        return
    problems = []
    major = int(str(trt_version).split(".")[0]) if trt_version and str(trt_version)[0].isdigit() else None
    if major is not None and major < FP8_MIN_TRT:
        problems.append(f"TensorRT {trt_version} is older than {FP8_MIN_TRT}")
    if compute_capability:
        cc = tuple(int(x) for x in str(compute_capability).split(".")[:2])
        if cc < FP8_MIN_CC:
            problems.append(f"this GPU's compute capability {compute_capability} has no FP8 tensor cores (needs "
                            f"{'.'.join(map(str, FP8_MIN_CC))}: Ada, Hopper or newer; Jetson Orin is 8.7)")
    if problems:
        raise EnginePrecisionError("cannot build an FP8 engine here: " + "; ".join(problems)
                                   + ". Build the int8 or fp16 engine instead (rebuild the bundle with --quantize int8)")


def asymmetric_qdq(onnx_path: Path) -> list[str]:
    """The Q/DQ nodes of ``onnx_path`` whose zero point is not 0 (or unsigned: uint8 activations), which TensorRT
    cannot take. Reads the graph's own initializers, not a record about it."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    bad = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None:
            continue
        unsigned = zp.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT4)
        if unsigned or np.any(numpy_helper.to_array(zp).astype(np.float64) != 0):
            bad.append(node.name or node.output[0])
    return bad


def check_ort_contrib(onnx_path: Path) -> None:
    """Refuse any graph holding ONNX Runtime's contrib operators (domain com.microsoft: the onnxruntime target's
    fused attention, ``exporters/ort_attention.py``), which TensorRT's ONNX parser does not know."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # a damaged graph: TensorRT's parser, next, reports it in its own words (one line)
        return
    ops = sorted({n.op_type for n in all_nodes(model.graph) if n.domain == ORT_DOMAIN})  # If / Loop bodies too
    if ops:
        raise EnginePrecisionError(
            f"{onnx_path.name} holds ONNX Runtime-only operators (com.microsoft {', '.join(ops)}: the onnxruntime "
            "target's fused graph), which TensorRT does not parse; rebuild the bundle with --target tensorrt")


def check_for_tensorrt(onnx_path: Path) -> None:
    """Refuse a quantized graph TensorRT cannot take: ONNX Runtime's own quantized operators (the onnxruntime
    target's MatMulInteger / MatMulNBits form), or Q/DQ nodes with zero points."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ort_only = sorted({n.op_type for n in model.graph.node if n.op_type in ORT_ONLY_OPS})
    if ort_only:
        raise EnginePrecisionError(
            f"{onnx_path.name} is quantized in ONNX Runtime's own operators ({', '.join(ort_only)}), which TensorRT "
            "does not parse; rebuild the bundle with --target tensorrt (Q/DQ graph)")
    bad = asymmetric_qdq(onnx_path)
    if bad:
        raise EnginePrecisionError(
            f"{onnx_path.name} is quantized with zero points (uint8 activations, for ONNX Runtime's CPU provider) in "
            f"{len(bad)} Q/DQ node(s), e.g. {bad[0]}; TensorRT takes symmetric quantization only. Rebuild the bundle "
            "with --target tensorrt (symmetric int8 activations)")
