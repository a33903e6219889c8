"""Quantization-aware distillation (``--qat-steps``): a last stage in which every ``nn.Linear`` of the student computes
with fake-quantized weights (and, for static INT8, fake-quantized input activations), so the student learns around
the rounding the exporter's quantizer will do (``exporters/quantize.py``) while the KD loss still pulls it to the
teacher. The rounding is torch's own (``torch.fake_quantize_per_channel_affine`` / ``_per_tensor_affine``, whose
gradient passes straight through inside the range); the weights stay float32 parameters, so masks, the optimizer,
checkpoints and ``save_pretrained`` see the usual student, and the exported graph is quantized for real by ONNX Runtime.

Per mode, what is simulated (matching the exporter):

- weights, every mode: symmetric, zero point 0 (a pruned zero stays exactly zero, so 2:4 survives), scale from the
  weight's current absolute maximum: per output channel in [-127, 127] for ``int8`` / ``int8-dynamic``, per block of
  32 in-features in [-8, 7] for ``int4-weight`` (a layer whose in-features are not a multiple of 32 stays float,
  as the exporter leaves it).
- activations (a Linear's input): ``int8`` per tensor, uint8 asymmetric with a range calibrated once per stage on the
  run's training sequences (minmax, as ``quantize_static`` calibrates; the onnxruntime target's form: TensorRT's
  symmetric int8 is not simulated); ``int8-dynamic`` per tensor from each call's own min/max (as ONNX Runtime
  quantizes at run time); ``int4-weight`` none (weight-only).

``fp8`` is not offered: torch has no fake-quant op for float8 with a straight-through gradient.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

QAT_MODES = ("int8-dynamic", "int8", "int4-weight")
BLOCK = 32  # exporters.quantize.BLOCK_SIZE (core sits below the exporters and cannot import it)
INT8 = (-127, 127)  # symmetric int8 weights as ONNX Runtime writes them (-128 unused, so the range is symmetric)
INT4 = (-8, 7)
UINT8 = (0, 255)


def describe(mode: str) -> dict[str, str]:
    """What the stage simulates, for its trajectory record."""
    weights = ("int4 symmetric, blocks of 32 in-features" if mode == "int4-weight"
               else "int8 symmetric, per output channel")
    acts = {"int8": "uint8 asymmetric per tensor, minmax-calibrated on the training split at the stage's start",
            "int8-dynamic": "uint8 asymmetric per tensor, from each call's own range",
            "int4-weight": "float (weight-only)"}[mode]
    return {"mode": mode, "weights": weights, "activations": acts,
            "rounding": "torch.fake_quantize_per_channel_affine / per_tensor_affine (straight-through gradient)"}


def fake_quant_weight(w: torch.Tensor, mode: str) -> torch.Tensor:
    """``w`` [out, in] rounded to the mode's symmetric grid and back (the scale is not trained)."""
    if mode == "int4-weight":
        blocks = w.reshape(-1, BLOCK)  # row-major: each row is one block of 32 consecutive in-features
        return _per_row(blocks, *INT4).reshape(w.shape)
    return _per_row(w, *INT8)


def _per_row(w: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    scale = (w.detach().abs().amax(dim=1).float() / qmax).clamp_min(1e-12)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, qmin, qmax).to(w.dtype)


def uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of an asymmetric uint8 range that holds 0 (as ONNX Runtime computes them)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / (UINT8[1] - UINT8[0])
    return scale, int(round(-lo / scale))


def _fake_quant_act(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, *UINT8).to(x.dtype)


def _dynamic_act(x: torch.Tensor) -> torch.Tensor:
    d = x.detach()
    return _fake_quant_act(x, *uint8_params(float(d.min()), float(d.max())))


def quantized_linears(model: nn.Module, mode: str) -> dict[str, nn.Linear]:
    """The Linear layers the exporter quantizes in ``mode`` (int4: those whose in-features fill whole blocks)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and (mode != "int4-weight" or m.in_features % BLOCK == 0)}


@torch.no_grad()
def calibrate(model: nn.Module, layers: dict[str, nn.Linear], batches: list[torch.Tensor], device
              ) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of each layer's input over ``batches`` of token ids: its min and max, as minmax calibration
    of the exported graph sees them (float model, no fake quantization)."""
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
    return {n: uint8_params(*seen[n]) for n in layers if n in seen}


@contextlib.contextmanager
def fake_quantized(model: nn.Module, mode: str, ranges: dict[str, tuple[float, int]] | None = None
                   ) -> Iterator[dict[str, nn.Linear]]:
    """Within the block, each of ``quantized_linears`` computes ``F.linear(fq(x), fq(W), b)``; ``ranges``: the
    calibrated activation parameters (static int8). The layers get their own ``forward`` for the block and lose it
    after, so parameters (names, objects) never change. A loss that reads ``lm_head.weight`` itself (the chunked KD
    path) trains that layer unquantized; held-out measurements always go through ``forward``."""
    layers = quantized_linears(model, mode)

    def forward(module: nn.Linear, x: torch.Tensor, act) -> torch.Tensor:
        if act is not None:
            x = act(x)
        return F.linear(x, fake_quant_weight(module.weight, mode), module.bias)

    for name, m in layers.items():
        if mode == "int8-dynamic":
            act = _dynamic_act
        elif mode == "int8" and ranges and name in ranges:
            scale, zero = ranges[name]
            act = (lambda s, z: lambda x: _fake_quant_act(x, s, z))(scale, zero)
        else:
            act = None
        m.forward = types.MethodType(lambda self, x, _act=act: forward(self, x, _act), m)
    try:
        yield layers
    finally:
        for m in layers.values():
            del m.forward  # back to nn.Linear.forward
