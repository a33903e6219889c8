"""The graph precisions a bundle can carry, declared once: the quantization modes and their calibration methods
(config, CLI choices, exporter), each precision's file name and manifest key. Imports nothing (config, the
exporters and the device-side commands all read it)."""

from __future__ import annotations

MODES = ("none", "int8-dynamic", "int8", "int4-weight", "fp8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
STATIC = ("int8", "fp8")  # the modes that calibrate activations
MIN_CALIBRATION = 4  # training sequences: fewer do not calibrate activation ranges
# model.<suffix>.onnx beside model.onnx, recorded as model.onnx_<key> beside model.onnx_fp16.
SUFFIX = {"fp16": "fp16", "int8-dynamic": "int8-dynamic", "int8": "int8", "int4-weight": "int4", "fp8": "fp8"}


def manifest_key(precision: str) -> str:
    """The manifest's ``model`` key of a precision's graph: ``onnx`` (fp32), ``onnx_fp16``, ``onnx_int8``, …"""
    return "onnx" if precision == "fp32" else "onnx_" + SUFFIX[precision].replace("-", "_")


PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8", "int4-weight", "fp8")
