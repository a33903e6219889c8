"""Quantization-aware distillation (``--qat-steps``): a last stage in which every ``nn.Linear`` of the student computes
with fake-quantized weights (and, for static INT8 / FP8, fake-quantized input activations), so the student learns
around the rounding the exporter's quantizer will do (``exporters/quantize.py``) for the build's target while the KD
loss still pulls it to the teacher. Integer rounding is torch's own (``torch.fake_quantize_per_channel_affine`` /
``_per_tensor_affine``, whose gradient passes straight through inside the range); float8 rounding is a cast to
``torch.float8_e4m3fn`` and back, made straight-through as ``x + (q(x) - x).detach()`` (torch has no float8
fake-quant op). The weights stay float32 parameters, so masks, the optimizer, checkpoints and ``save_pretrained``
see the usual student, and the exported graph is quantized for real by ONNX Runtime.

Per mode and target (``qat_target``: build sets it to its ``--target``; a ``distill`` on its own simulates
``onnxruntime`` unless its recipe says ``qat_target: tensorrt``), what is simulated (matching the exporter):

- weights: symmetric, zero point 0 (a pruned zero stays exactly zero, so 2:4 survives), scale from the weight's
  current absolute maximum: per output channel in [-127, 127] for ``int8`` / ``int8-dynamic``, per block of 32
  in-features for ``int4-weight`` on ONNX Runtime's grid (scale: the block's largest-magnitude value over -8, codes
  [-8, 7]; a layer whose in-features are not a multiple of 32 stays float, as the exporter leaves it), per tensor
  amax / 448 in float8 e4m3fn for ``fp8``. Also the embedding tables where the graph's Gather reads a quantized
  copy: ``int8`` and ``int8-dynamic`` (``quantize_dynamic`` quantizes a Gather from a constant table too) an 8-bit
  copy per tensor — int8 symmetric for tensorrt, uint8 asymmetric for onnxruntime, as ONNX Runtime types a Gather's
  table like the activations —, ``int4-weight`` for onnxruntime an int4 copy in blocks of 32 along the hidden axis
  (GatherBlockQuantized); fp8 and int4 for tensorrt keep float Gathers.
- activations (a Linear's input), per tensor, from ranges calibrated once per stage on the run's training sequences
  (the max / min the exporter's MinMax calibration sees): ``int8`` for onnxruntime uint8 asymmetric (its U8S8
  kernels), ``int8`` for tensorrt int8 symmetric (zero point 0, scale amax / 127, codes saturating in [-128, 127]:
  ORT's symmetric QInt8 range and QuantizeLinear's), ``fp8`` (tensorrt only) float8 e4m3fn with scale amax / 448
  (``exporters.quantize._fp8_amax_overrides``); ``int8-dynamic`` per tensor from each call's own min/max (as ONNX
  Runtime quantizes at run time); ``int4-weight`` none (weight-only; ORT's CPU kernel MatMulNBits at accuracy
  level 4 rounds its input to int8 internally, in a way not simulated: README, quantization-aware distillation).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

QAT_MODES = ("int8-dynamic", "int8", "int4-weight", "fp8")
TARGETS = ("onnxruntime", "tensorrt")
# The runtimes whose quantized graph of a mode this module simulates (exporters.quantize.RUNTIMES, which core cannot
# import): the exporter refuses the other pairs.
QAT_TARGETS = {"int8-dynamic": ("onnxruntime",), "int8": TARGETS, "int4-weight": TARGETS, "fp8": ("tensorrt",)}
BLOCK = 32  # exporters.quantize.BLOCK_SIZE (core sits below the exporters and cannot import it)
INT8 = (-127, 127)  # symmetric int8 weights as ONNX Runtime writes them (-128 unused, so the range is symmetric)
INT8_CODES = (-128, 127)  # what QuantizeLinear saturates int8 activations to (the scale maps amax onto 127)
INT4 = (-8, 7)
UINT8 = (0, 255)
FP8_MAX = 448.0  # float8 e4m3fn's largest finite value (exporters.quantize.FP8_MAX)


def scheme(mode: str, target: str = "onnxruntime") -> str:
    """The activation scheme the stage simulates: uint8 | int8-symmetric | fp8 | dynamic | none."""
    if mode == "int8":
        return "int8-symmetric" if target == "tensorrt" else "uint8"
    return {"fp8": "fp8", "int8-dynamic": "dynamic"}.get(mode, "none")


def describe(mode: str, target: str = "onnxruntime") -> dict[str, str]:
    """What the stage simulates, for its trajectory record."""
    weights = {"int4-weight": "int4 symmetric, blocks of 32 in-features, scale: the block's largest-magnitude value / -8",
               "fp8": "float8 e4m3fn per tensor, scale amax / 448 (zero point 0)"}.get(
        mode, "int8 symmetric, per output channel")
    acts = {"uint8": "uint8 asymmetric per tensor, minmax-calibrated on the training split at the stage's start",
            "int8-symmetric": "int8 symmetric per tensor (zero point 0, scale amax / 127), minmax-calibrated on the "
                              "training split at the stage's start",
            "fp8": "float8 e4m3fn per tensor, scale amax / 448, amax calibrated on the training split at the stage's "
                   "start",
            "dynamic": "uint8 asymmetric per tensor, from each call's own range",
            "none": "float (weight-only)"}[scheme(mode, target)]
    rounding = ("float8 e4m3fn cast, straight-through (x + (q(x) - x).detach())" if mode == "fp8"
                else "torch.fake_quantize_per_channel_affine / per_tensor_affine (straight-through gradient)")
    out = {"mode": mode, "target": target, "weights": weights, "activations": acts, "rounding": rounding}
    if mode in ("int8", "int8-dynamic"):
        out["embeddings"] = ("int8 symmetric, per tensor" if target == "tensorrt" else
                             "uint8 asymmetric, per tensor") + " (the graph's Gather tables)"
    elif mode == "int4-weight" and target == "onnxruntime":
        out["embeddings"] = "int4 symmetric, blocks of 32 along the hidden axis (the graph's GatherBlockQuantized)"
    return out


def fake_quant_weight(w: torch.Tensor, mode: str) -> torch.Tensor:
    """``w`` [out, in] rounded to the mode's symmetric grid and back (the scale is not trained)."""
    if mode == "int4-weight":
        blocks = w.reshape(-1, BLOCK)  # row-major: each row is one block of 32 consecutive in-features
        return _int4_blocks(blocks).reshape(w.shape)
    if mode == "fp8":
        return fake_fp8(w, float(w.detach().abs().max()))
    return _per_row(w, *INT8)


def fake_fp8(x: torch.Tensor, amax: float) -> torch.Tensor:
    """``x`` through float8 e4m3fn at scale amax / 448 and back, as QuantizeLinear (saturating) -> DequantizeLinear
    compute it; the gradient passes straight through (the rounding is detached)."""
    s = amax / FP8_MAX if amax > 0 else 1.0  # an all-zero tensor stays zero at any scale; 1 as the exporter
    xf = x.float()
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * s
    return (xf + (q - xf).detach()).to(x.dtype)


def _int4_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Each row (a block) on ONNX Runtime's symmetric int4 grid (MLAS ``MlasQuantizeBlockwise``, under
    ``MatMulNBitsQuantizer`` for both targets): the scale is the block's largest-magnitude value ``m`` over -8, so
    ``m`` itself is code -8 (exact) and the other sign saturates at code 7, 7/8 of ``|m|``. As a positive-scale fake
    quant: ``s * fq(s * x)`` with ``s = -sign(m)``, scale ``|m| / 8``, codes [-8, 7]. The gradient passes straight
    through to every weight, the saturated ones too (they lie inside the block's range: only the grid is lopsided)."""
    d = blocks.detach()
    lo, hi = d.amin(dim=1), d.amax(dim=1)
    m = torch.where(lo.abs() > hi.abs(), lo, hi)  # MLAS: |min| > |max| ? min : max
    sign = torch.where(m > 0, -1.0, 1.0)[:, None]
    scale = (m.abs().float() / -INT4[0]).clamp_min(1e-12)
    zero = torch.zeros(blocks.shape[0], dtype=torch.int32, device=blocks.device)
    q = torch.fake_quantize_per_channel_affine(d.float() * sign, scale, zero, 0, *INT4) * sign
    return blocks + (q.to(blocks.dtype) - blocks).detach()


def _per_row(w: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    scale = (w.detach().abs().amax(dim=1).float() / qmax).clamp_min(1e-12)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, qmin, qmax).to(w.dtype)


def uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of an asymmetric uint8 range that holds 0 (as ONNX Runtime computes them)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / (UINT8[1] - UINT8[0])
    return scale, int(round(-lo / scale))


def _fake_quant_act(x: torch.Tensor, scale: float, zero: int, qmin: int = UINT8[0], qmax: int = UINT8[1]
                    ) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, qmin, qmax).to(x.dtype)


def act_quantizer(kind: str, lo: float, hi: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fake quantization of a Linear's input whose calibrated range is [lo, hi], per scheme."""
    amax = max(abs(lo), abs(hi))
    if kind == "uint8":
        scale, zero = uint8_params(lo, hi)
        return lambda x: _fake_quant_act(x, scale, zero)
    if kind == "int8-symmetric":
        scale = max(amax, 1e-8) / INT8[1]  # ORT: (2 amax) / (127 - (-127))
        return lambda x: _fake_quant_act(x, scale, 0, *INT8_CODES)
    if kind == "fp8":
        return lambda x: fake_fp8(x, amax)
    raise ValueError(f"no calibrated activation quantizer for {kind!r}")


def _dynamic_act(x: torch.Tensor) -> torch.Tensor:
    d = x.detach()
    return _fake_quant_act(x, *uint8_params(float(d.min()), float(d.max())))


def quantized_embeddings(model: nn.Module, mode: str, target: str = "onnxruntime") -> dict[str, nn.Embedding]:
    """The embedding tables the exported graph reads quantized (``fake_quant_rows`` rounds them as it does): int8
    (static, and int8-dynamic: ``quantize_dynamic`` quantizes a Gather from a constant table too) an 8-bit copy per
    tensor, whose Gather's output adds no rounding (the static graph's Q/DQ reuses the table's scale); int4-weight
    for onnxruntime an int4 copy in blocks of 32 along the hidden axis (GatherBlockQuantized), where the width fills
    whole blocks. fp8 and int4-weight for tensorrt leave the Gathers float (ORT writes no such QDQ Gather)."""
    if mode in ("int8", "int8-dynamic"):
        return {name: m for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    if mode == "int4-weight" and target == "onnxruntime":
        return {name: m for name, m in model.named_modules()
                if isinstance(m, nn.Embedding) and m.embedding_dim % BLOCK == 0}
    return {}


def fake_quant_rows(table: torch.Tensor, rows: torch.Tensor, target: str = "onnxruntime", mode: str = "int8"
                    ) -> torch.Tensor:
    """``rows`` gathered from ``table``, rounded as the ``mode`` graph stores the whole table. int8 (static or
    dynamic): per tensor; ONNX Runtime types the Gather's table like the activations: int8 symmetric for tensorrt
    (zero point 0, scale amax / 127), uint8 asymmetric for onnxruntime (its min / max; a zero weight comes back as
    ±scale/2 at most). int4-weight: each row's blocks of 32 as the weights' (``_int4_blocks``). The rounding is
    elementwise once the table's scales are known, so only the gathered rows are rounded, not the table."""
    if mode == "int4-weight":
        return _int4_blocks(rows.reshape(-1, BLOCK)).reshape(rows.shape)
    d = table.detach()
    if target == "tensorrt":
        scale = max(float(d.abs().max()), 1e-12) / INT8[1]
        return torch.fake_quantize_per_tensor_affine(rows.float(), scale, 0, *INT8).to(rows.dtype)
    return _fake_quant_act(rows, *uint8_params(float(d.min()), float(d.max())))


def quantized_linears(model: nn.Module, mode: str) -> dict[str, nn.Linear]:
    """The Linear layers the exporter quantizes in ``mode`` (int4: those whose in-features fill whole blocks)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and (mode != "int4-weight" or m.in_features % BLOCK == 0)}


@torch.no_grad()
def calibrate(model: nn.Module, layers: dict[str, nn.Linear], batches: list[torch.Tensor], device
              ) -> dict[str, tuple[float, float]]:
    """(min, max) of each layer's input over ``batches`` of token ids, as minmax calibration of the exported graph
    sees them (float model, no fake quantization); each scheme makes its scale from them (``act_quantizer``)."""
    seen: dict[str, list[float]] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach()
            lo, hi = float(x.min()), float(x.max())
            prev = seen.get(name)
            seen[name] = [lo, hi] if prev is None else [min(prev[0], lo), max(prev[1], hi)]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    training = model.training
    model.eval()  # dropout off, as in the exported graph
    try:
        for ids in batches:
            model(input_ids=ids.to(device))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return {n: (seen[n][0], seen[n][1]) for n in layers if n in seen}


@contextlib.contextmanager
def fake_quantized(model: nn.Module, mode: str, ranges: dict[str, tuple[float, float]] | None = None,
                   target: str = "onnxruntime") -> Iterator[dict[str, nn.Linear]]:
    """Within the block, each of ``quantized_linears`` computes ``F.linear(fq(x), fq(W), b)``; ``ranges``: the
    calibrated (min, max) of each layer's input (static int8 / fp8), rounded as ``target``'s graph rounds them. The
    layers get their own ``forward`` for the block and lose it after, so parameters (names, objects) never change. A
    loss that reads ``lm_head.weight`` itself (the chunked KD path) trains that layer unquantized; held-out
    measurements always go through ``forward``."""
    layers = quantized_linears(model, mode)
    kind = scheme(mode, target)

    def forward(module: nn.Linear, x: torch.Tensor, act) -> torch.Tensor:
        if act is not None:
            x = act(x)
        return F.linear(x, fake_quant_weight(module.weight, mode), module.bias)

    for name, m in layers.items():
        if kind == "dynamic":
            act = _dynamic_act
        elif kind in ("uint8", "int8-symmetric", "fp8") and ranges and name in ranges:
            act = act_quantizer(kind, *ranges[name])
        else:
            act = None
        m.forward = types.MethodType(lambda self, x, _act=act: forward(self, x, _act), m)
    tables = quantized_embeddings(model, mode, target)
    for m in tables.values():
        m.forward = types.MethodType(lambda self, ids: fake_quant_rows(self.weight, F.embedding(
            ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse),
            target, mode), m)
    try:
        yield layers
    finally:
        for m in [*layers.values(), *tables.values()]:
            del m.forward  # back to the class's forward
