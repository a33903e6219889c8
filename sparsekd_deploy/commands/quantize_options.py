"""The quantization flags shared by ``build`` and ``export`` (one declaration, one help text)."""

from __future__ import annotations

import click

from ..precisions import CALIBRATION_METHODS, MIN_CALIBRATION, MODES

QUANTIZE_OPTIONS = [
    ("--quantize", "quantize", dict(type=click.Choice(MODES), help="Also write a quantized copy beside model.onnx "
                                    "(model.int8.onnx, …) with onnxruntime.quantization, audited for the student's "
                                    "zeros: int8-dynamic (ONNX Runtime CPU), int8 (static QDQ, calibrated; ONNX Runtime "
                                    "or TensorRT), int4-weight (MatMulNBits / int4 QDQ), fp8 (TensorRT only). "
                                    "[default: none]")),
    ("--calibration", "calibration", dict(type=click.Choice(CALIBRATION_METHODS),
                                          help="int8: how activation ranges are calibrated (fp8 always takes amax, max |x|, "
                                               "as Model Optimizer's FP8 default does). [default: minmax]")),
    ("--calibration-samples", "calibration_samples",
     dict(type=click.IntRange(min=MIN_CALIBRATION), help="Static modes: training sequences of the run that calibrate "
                                                          "(the held-out ones never do). [default: 32]")),
]


def quantize_options(fn):
    for flag, dest, kwargs in reversed(QUANTIZE_OPTIONS):
        fn = click.option(flag, dest, default=None, **kwargs)(fn)
    return fn


def quantize_flags(flags: dict) -> dict:
    """The quantization flags given on the command line (pops them from ``flags``), for the config overrides."""
    return {dest: flags.pop(dest, None) for _, dest, _ in QUANTIZE_OPTIONS}
