"""Quantized copies of an exported graph, made by ONNX Runtime's own quantizers (``onnxruntime.quantization``);
this module only chooses their settings per mode and target, feeds calibration data, and records what it did.

Per mode (and why):

- ``int8-dynamic``: ``quantize_dynamic``, per-channel symmetric INT8 weights (zero point 0, so every pruned zero
  stays exactly zero), activations quantized at run time (MatMulInteger). No calibration. ONNX Runtime only:
  TensorRT has no dynamic quantization.
- ``int8``: ``quantize_static`` in QDQ format, per-channel symmetric INT8 weights on the output-channel axis
  (the layout TensorRT's explicit quantization requires), activations calibrated on the run's own distillation
  data. Activations are asymmetric UINT8 for ONNX Runtime's CPU provider (its U8S8 kernels; the symmetric S8S8
  graph decoded 23x slower here, scripts/bench_quantize.py) and symmetric INT8 (zero point 0) for TensorRT, the only
  form it takes. Only the weight-bearing ops are quantized, on their inputs (weight + input activation), as
  TensorRT's explicit quantization of Linear layers does: left to its defaults ``quantize_static`` also quantizes
  activation x activation MatMuls (attention Q.K^T, softmax.V, the rotary angles) and every MatMul's *output* (the
  logits included; its ``MatMulConstBOnly`` is ignored in QDQ format), which doubled the demo student's KL to the
  teacher (2.13x fp32; 1.11x with the selection here, README). The ops left float are named in ``kept_float``.
- ``int4-weight``: ``MatMulNBitsQuantizer``, 4-bit symmetric block-wise weights (block 32); MatMulNBits +
  GatherBlockQuantized for ONNX Runtime, DequantizeLinear(int4) -> MatMul (QDQ) for TensorRT. A layer whose
  in-features are not a multiple of the block is left unquantized and named.
- ``fp8``: ``quantize_static`` with FLOAT8E4M3FN QDQ on the same nodes as ``int8``'s MatMuls, every scale given
  by this module as a per-tensor override (``TensorQuantOverrides``): amax / 448 (e4m3fn's largest finite value),
  the recipe of NVIDIA Model Optimizer's FP8 default (``FP8_DEFAULT_CFG``: per-tensor weights and inputs,
  ``"max"`` calibration). Weight amax is the initializer's max |w|; activation amax is the max |x| that ONNX
  Runtime's own MinMax calibrator (symmetric) records over the calibration feeds. Left to itself ORT derives float8
  scales from the spread (std) of a histogram, the only calibration it allows for floats, which clipped the largest
  weights and activations (demo KL to the teacher 0.125 vs int8's 0.0197). ORT still runs that histogram pass (it
  refuses float8 without it); no scale comes from it. Zero point 0 and amax scaling keep every pruned zero exactly
  zero and no weight saturated. Per-tensor weights, not per channel: Model Optimizer's FP8 default, and what
  TensorRT's quantization schemes page defines FP8 Q/DQ with (a scalar scale; per-channel FP8 weights are not
  stated there, INT8 per-channel is). Only TensorRT on an FP8 GPU
  (Ada, Hopper, Thor) runs it natively; ONNX Runtime's CPU provider only emulates the Q/DQ.

NVIDIA Model Optimizer's ONNX quantizer (nvidia-modelopt[onnx] 0.47, the newest, checked again for fp8) would
replace the CPU onnxruntime with onnxruntime-gpu ~= 1.24 on Linux x86-64, pin onnx ~= 1.21 (this project uses 1.23)
and pull cupy-cuda12x, which breaks the build host's CPU install; ORT's QDQ output is the explicit quantization
TensorRT parses, so it is used for both runtimes, with Model Optimizer's FP8 scale recipe computed here.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SparseKDError
from ..precisions import CALIBRATION_METHODS, MODES, STATIC, SUFFIX

RUNTIMES = {"int8-dynamic": ("onnxruntime",), "int8": ("onnxruntime", "tensorrt"),
            "int4-weight": ("onnxruntime", "tensorrt"), "fp8": ("tensorrt",)}
BLOCK_SIZE = 32


class QuantizeError(SparseKDError):
    pass


@dataclass
class QuantizeInfo:
    mode: str
    path: str
    quantizer: str  # the library call that made it, with the onnxruntime version
    format: str  # QOperator (MatMulInteger / MatMulNBits) or QDQ
    weights: str
    activations: str
    calibration: dict | None = None  # method, sequences, tokens, source (static modes)
    skipped: list[str] = field(default_factory=list)  # layers left unquantized, with the reason
    kept_float: dict[str, list[str]] = field(default_factory=dict)  # static modes: why -> the ops left float for it

    def to_dict(self) -> dict:
        return asdict(self)


def quantized_path(onnx_path: Path, mode: str) -> Path:
    return onnx_path.with_name(f"{onnx_path.stem}.{SUFFIX[mode]}.onnx")


def check_mode(mode: str, target: str) -> None:
    """Refuse, before any work, a mode the target runtime cannot run; the message names the runtime that can."""
    if mode not in MODES:
        raise QuantizeError(f"unknown quantization {mode!r}; choose from {', '.join(MODES)}")
    if mode == "none" or target in RUNTIMES[mode]:
        return
    if mode == "fp8":
        raise QuantizeError(f"--quantize fp8 cannot run on {target}: FP8 needs TensorRT (>= 10) on a GPU with FP8 "
                            "tensor cores (Ada, Hopper, Thor; NVIDIA Model Optimizer targets the same); ONNX Runtime's "
                            "CPU provider has no FP8 kernels. Build with --target tensorrt, or use --quantize int8")
    raise QuantizeError(f"--quantize {mode} cannot run on {target}: it runs on {' or '.join(RUNTIMES[mode])}; for "
                        f"{target} use --quantize {'int8' if target == 'tensorrt' else 'int8-dynamic'}")


class _Feeds:
    """ORT's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


@contextlib.contextmanager
def quiet_ort():
    """ORT's quantizers log every node on the root logger and print calibration tables on stdout, and its
    transformers fusers log from top-level module loggers ("fusion_skiplayernorm") and print "failed in shape
    inference": noise to a user (it broke a command's --json output before commands kept stdout for the JSON), so
    both are silenced for the call and restored afterwards."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def fold_transposed_weights(model) -> int:
    """Give every MatMul whose B is ``Transpose(initializer)`` (a tied lm_head reading the embedding) its own
    transposed initializer, so the weight-only quantizers, which skip a non-constant B, quantize it too.
    Returns how many MatMuls were rewired."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    folded = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        arr = numpy_helper.to_array(inits[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        name = f"{t.input[0]}_transposed_for_{node.name or folded}".replace("/", "_")
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(arr, perm)), name))
        node.input[1] = name
        folded += 1
    still_used = {x for n in model.graph.node for x in n.input}
    for t in [n for n in model.graph.node if n.op_type == "Transpose" and n.output[0] not in still_used]:
        model.graph.node.remove(t)
    return folded


def _weight_matmuls(model) -> list[tuple[str, tuple]]:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [(n.name, inits[n.input[1]]) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


ACT_MATMUL = ("activation x activation MatMul (attention scores, weighted values, rotary angles): no weight; left "
              "float as TensorRT's quantization of Linear layers leaves it")
OUTPUTS = ("outputs of the quantized nodes: no QuantizeLinear after them, the next op reads float (rounding happens "
           "once per layer, on its inputs)")


def _static_selection(model, ops: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The nodes static quantization takes (a MatMul with a constant weight, a Gather from a constant table) and
    the float MatMuls it leaves alone (Gathers of shapes are integer: nothing to say about them)."""
    inits = {i.name for i in model.graph.initializer}
    take, keep = [], []
    for n in model.graph.node:
        if n.op_type not in ops:
            continue
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            take.append(n.name)
        elif n.op_type == "Gather" and n.input[0] in inits:
            take.append(n.name)
        elif n.op_type == "MatMul":
            keep.append(n.name)
    return take, keep


def quantize_onnx(src: str | Path, dst: str | Path, mode: str, *, target: str = "onnxruntime",
                  calibration: list[dict] | None = None, calibration_info: dict | None = None,
                  method: str = "minmax") -> QuantizeInfo:
    """Write the ``mode`` copy of the graph ``src`` to ``dst`` (temp name, then rename: never half-written).
    ``calibration``: feed dicts for the static modes (the caller builds them from training data, never held-out);
    ``calibration_info`` is recorded as given, with the method."""
    import onnx
    import onnxruntime as ort

    check_mode(mode, target)
    if mode == "none":
        raise QuantizeError("quantize_onnx needs a quantization mode, not 'none'")
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose from {', '.join(CALIBRATION_METHODS)}")
    if mode in STATIC and not calibration:
        raise QuantizeError(f"--quantize {mode} calibrates activations and got no calibration data; give it the "
                            "run's data (distill makes data.safetensors) or use --quantize int8-dynamic")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    if sum(i.ByteSize() for i in model.graph.initializer) > 1_800_000_000:
        raise QuantizeError(f"{src.name} holds over 1.8 GB of weights: quantizing graphs with external data is not "
                            "supported yet; export a smaller model or quantize it with onnxruntime.quantization directly")
    fold_transposed_weights(model)
    tmp = dst.with_name(dst.name + ".tmp")
    version = f"onnxruntime {ort.__version__}"
    try:
        with quiet_ort():
            if mode == "int8-dynamic":
                info = _dynamic(model, tmp, version)
            elif mode == "int4-weight":
                info = _int4(model, tmp, target, version)
            else:
                info = _static(model, tmp, mode, target, calibration, method, version)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    info.path = str(dst)
    if mode in STATIC:
        # fp8 takes amax (max |x|) whatever was asked: the recipe its scales follow (module docstring).
        info.calibration = {"method": method if mode == "int8" else "amax", "requested_method": method,
                            **(calibration_info or {}), "batches": len(calibration)}
    return info


def _dynamic(model, out: Path, version: str) -> QuantizeInfo:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # WeightSymmetric (the default, set explicitly): zero point 0 keeps the pruned zeros exactly zero.
    quantize_dynamic(model, str(out), per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True})
    return QuantizeInfo("int8-dynamic", "", f"onnxruntime.quantization.quantize_dynamic ({version})",
                        "QOperator (MatMulInteger)", "int8 symmetric, per output channel",
                        "uint8 asymmetric, quantized per call at run time")


FP8_MAX = 448.0  # float8 e4m3fn's largest finite value: amax maps onto it


def _fp8_amax_overrides(model, nodes: list[str], feeds: list[dict]) -> dict[str, list[dict]]:
    """ORT ``TensorQuantOverrides`` giving every tensor the fp8 QDQ quantizes (each selected MatMul's activation
    input and constant weight) the scale amax / 448 with zero point 0 (Model Optimizer's FP8 default recipe).
    Weight amax: max |w| of the initializer. Activation amax: ONNX Runtime's MinMax calibrator, symmetric (so its
    range is (-amax, amax)), over ``feeds``."""
    import tempfile

    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.quant_utils import ONNX_TYPE_TO_NP_TYPE

    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(nodes)
    chosen = [n for n in model.graph.node if n.name in wanted]
    # The calibrator reads a model file (it adds ReduceMin/ReduceMax outputs to a copy): write this one, folded.
    with tempfile.TemporaryDirectory(prefix="sparsekd-fp8-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, str(path))
        calibrator = create_calibrator(path, ["MatMul"], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": True})
        calibrator.collect_data(_Feeds(feeds))
        ranges = calibrator.compute_data()
        del calibrator  # holds an ORT session on the temporary files
    zero = np.array(0, dtype=ONNX_TYPE_TO_NP_TYPE[onnx.TensorProto.FLOAT8E4M3FN])

    def scale(amax: float) -> np.ndarray:
        # An all-zero tensor has no range: any scale keeps it zero; 1 avoids a zero scale in the graph.
        return np.array(amax / FP8_MAX if amax > 0 else 1.0, dtype=np.float32)

    overrides = {}
    for node in chosen:
        act, weight = node.input[0], node.input[1]
        amax = float(np.abs(numpy_helper.to_array(inits[weight])).max())
        overrides[weight] = [{"scale": scale(amax), "zero_point": zero}]
        if act not in ranges:
            raise QuantizeError(f"fp8 calibration recorded no range for {act} (input of {node.name}); the graph "
                                "cannot be quantized with amax scales")
        overrides[act] = [{"scale": scale(float(np.max(np.abs(ranges[act].range_value)))), "zero_point": zero}]
    return overrides


def _static(model, out: Path, mode: str, target: str, feeds, method: str, version: str) -> QuantizeInfo:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ops = ("MatMul", "Gather") if mode == "int8" else ("MatMul",)
    nodes, kept = _static_selection(model, ops)
    extra = {}
    if mode == "fp8":
        weight = act = QuantType.QFLOAT8E4M3FN
        calib = CalibrationMethod.Distribution  # ORT refuses float8 without it; the overrides set every scale
        symmetric, acts = True, "float8 e4m3fn, per tensor, scale amax / 448"
        extra["TensorQuantOverrides"] = _fp8_amax_overrides(model, nodes, feeds)
    else:
        weight = QuantType.QInt8
        symmetric = target == "tensorrt"  # TensorRT takes zero point 0 only; ORT CPU's fast kernels are U8S8
        act = QuantType.QInt8 if symmetric else QuantType.QUInt8
        calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
        acts = "int8 symmetric (zero point 0)" if symmetric else "uint8 asymmetric"
    # Q/DQ on the inputs only: an output QDQ would round each layer's result (and the logits) once more, which
    # TensorRT's explicit quantization of a Linear layer does not do either.
    quantize_static(model, str(out), _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=mode == "int8",
                    activation_type=act, weight_type=weight, calibrate_method=calib,
                    op_types_to_quantize=list(ops), nodes_to_quantize=nodes,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": symmetric,
                                   "MatMulConstBOnly": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                                   "OpTypesToExcludeOutputQuantization": list(ops), **extra})
    weights = ("int8 symmetric, per output channel" if mode == "int8"
               else "float8 e4m3fn, per tensor, scale amax / 448 (zero point 0)")
    return QuantizeInfo(mode, "", f"onnxruntime.quantization.quantize_static ({version})", "QDQ", weights,
                        f"{acts}, calibrated, on the inputs of the {len(nodes)} weight-bearing nodes",
                        kept_float={ACT_MATMUL: kept, OUTPUTS: nodes})


def _nbits_quantizer():
    """ORT's MatMulNBitsQuantizer class. Its module calls ``logging.basicConfig(level=INFO)`` when first imported, which
    made the root logger print every library's INFO lines for the rest of the process (ORT's fusers: ~100 lines per
    graph on stderr after an int4 quantization): the root logger's level and handlers are put back."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
    return MatMulNBitsQuantizer


def _int4(model, out: Path, target: str, version: str) -> QuantizeInfo:
    from onnxruntime.quantization import QuantFormat

    MatMulNBitsQuantizer = _nbits_quantizer()  # noqa: N806 - a class

    skipped, exclude = [], []
    for name, dims in _weight_matmuls(model):
        if dims[0] % BLOCK_SIZE:
            exclude.append(name)
            skipped.append(f"{name}: in-features {dims[0]} are not a multiple of the block size {BLOCK_SIZE}; "
                           "left fp32")
    qdq = target == "tensorrt"
    ops = ("MatMul",) if qdq else ("MatMul", "Gather")  # ORT writes no QDQ Gather for int4
    if not qdq:
        inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]][-1] % BLOCK_SIZE:
                exclude.append(n.name)
                skipped.append(f"{n.name}: embedding width {inits[n.input[0]][-1]} is not a multiple of the block "
                               f"size {BLOCK_SIZE}; left fp32")
    # accuracy_level 4: int8 compute on the activations (ORT's fast CPU path); the weights stay 4-bit either way.
    q = MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=None if qdq else 4,
                             nodes_to_exclude=exclude, quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
                             op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    fmt = "QDQ (DequantizeLinear int4 -> MatMul)" if qdq else "QOperator (MatMulNBits, GatherBlockQuantized)"
    return QuantizeInfo("int4-weight", "", f"onnxruntime.quantization.MatMulNBitsQuantizer ({version})", fmt,
                        f"int4 symmetric, blocks of {BLOCK_SIZE} along the in-features", "fp32 (weight-only)",
                        skipped=skipped)
