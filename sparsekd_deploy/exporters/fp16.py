"""FP16 copy of an ONNX graph. TensorRT 11 builds FP16 only from an FP16 graph (networks are strongly typed),
and FP16 halves the weights on disk for every runtime. Inputs/outputs stay fp32 (casts at the edges) so the
same runtime code and references work on both graphs."""

from __future__ import annotations

from pathlib import Path

from .onnx import save_onnx


def convert_fp16(src: str | Path, dst: str | Path, keep_io_types: bool = True) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # Norm/softmax ops stay fp32 where the converter's default block list says so (numerical range).
    half = convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=True)
    size = sum(init.ByteSize() for init in half.graph.initializer)
    from .onnx import EXTERNAL_DATA_BYTES

    save_onnx(half, Path(dst), size > EXTERNAL_DATA_BYTES)
    return Path(dst)
