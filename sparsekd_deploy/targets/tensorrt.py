"""TensorRT target: run an engine plan with the KV cache through I/O tensors. Device buffers come from whichever CUDA
binding is installed (``cuda_memory``: cuda-python on a lean device install, else torch); present key/values stay on
the GPU and feed the next step as past key/values.

Compatibility (TensorRT version, compute capability, the plan header) is checked *before* deserialisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..exporters.decoder_feeds import decoder_feed
from ..exporters.tensorrt import RUN_HINT, import_tensorrt, list_logger
from ..exporters.trt_compat import check_compat, check_plan_file, this_machine
from ..exporters.trt_logs import parse_deserialize_error
from .base import TARGETS, ShapeLimits, Target, TargetError


def tensor_address(tensor, fallback) -> int:
    """TensorRT needs a non-null address even for an empty tensor (the first step's zero-length past);
    torch (and ``cuda_memory``) give empty buffers a null data pointer, so those get a small live buffer's address
    instead."""
    return tensor.data_ptr() if tensor.numel() else fallback.data_ptr()


@TARGETS.register("tensorrt")
class TensorRTTarget(Target):
    name = "tensorrt"

    def __init__(self, model_path: str | Path, engine: dict | None = None, max_positions: int | None = None, **_):
        from ..cuda_memory import backend, choose

        trt = import_tensorrt(RUN_HINT)
        choose()  # no CUDA binding installed: say so, rather than "no GPU" from the checks below
        plan = Path(model_path)
        engine = engine or {}
        check_compat(engine, this_machine())
        check_plan_file(plan, engine)
        self.trt = trt
        log: list[str] = []
        self._logger = list_logger(trt, log)  # must outlive the engine
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            mismatch = parse_deserialize_error("\n".join(log))
            detail = f" ({mismatch['kind']}: engine {mismatch['engine']}, runtime {mismatch['runtime']})" if mismatch else ""
            raise TargetError(f"TensorRT could not deserialize {plan.name}{detail}; rebuild it with `sparsekd-deploy engine build`")
        self.context = self.engine.create_execution_context()
        self.mem = backend()
        self._placeholder = self.mem.empty((256,), np.uint8)  # address for empty tensors
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.max_positions = max_positions
        self.limits = ShapeLimits.from_profile(engine.get("profile"))  # rows beyond batch max run in chunks
        self.engine_record = engine

    def describe(self) -> dict:
        return {"runtime": "tensorrt", "version": self.trt.__version__, "provider": "tensorrt", **this_machine()}

    def _dtype(self, name) -> type:
        trt = self.trt
        return {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT64: np.int64,
                trt.DataType.INT32: np.int32, trt.DataType.BOOL: np.bool_}[self.engine.get_tensor_dtype(name)]

    def _forward(self, ids: np.ndarray, past: dict | None, past_len: int) -> tuple[np.ndarray, dict]:
        mem = self.mem
        B = ids.shape[0]
        host = decoder_feed(ids, past_len)
        keep = []
        for name in self.inputs:
            if name in self.past_names:
                if past is None:
                    shape = list(self.engine.get_tensor_shape(name))
                    tensor = mem.empty((B, shape[1], 0, shape[3]), self._dtype(name))  # zero elements
                else:
                    tensor = past[name]
            else:
                tensor = mem.from_host(host[name].astype(self._dtype(name), copy=False))
            tensor = tensor.contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor_address(tensor, self._placeholder))
        outs = {}
        for name in self.outputs:
            outs[name] = mem.empty(tuple(self.context.get_tensor_shape(name)), self._dtype(name))
            self.context.set_tensor_address(name, tensor_address(outs[name], self._placeholder))
        if not self.context.execute_async_v3(mem.stream_handle()):
            raise TargetError("TensorRT execution failed")
        mem.synchronize()
        new_past = {p: outs[p.replace("past_key_values.", "present.")] for p in self.past_names}
        return mem.to_host(outs["logits"]).astype(np.float32), new_past
