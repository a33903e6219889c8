"""Device memory and GPU facts for the TensorRT path, through whichever CUDA binding is installed.

A lean device install has NVIDIA's ``cuda-python`` (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6) and no
torch; a build host has torch. :func:`backend` picks one on first use (cuda-python first: it is the light one),
``SPARSEKD_CUDA_BINDING=torch|cuda-python`` forces one. Nothing here is imported at package import time.

Both backends hand out :class:`DeviceArray`-like objects with ``shape``, ``data_ptr()`` and ``numel()``; host data is
converted to the engine's dtype with NumPy before the copy.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import SparseKDError

BINDINGS = ("cuda-python", "torch")  # preference order
ENV = "SPARSEKD_CUDA_BINDING"


class CudaBindingError(SparseKDError):
    pass


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _import_torch():
    import torch

    return torch


_IMPORTERS = {"cuda-python": _import_cudart, "torch": _import_torch}


def choose(order: tuple[str, ...] | None = None) -> tuple[str, object]:
    """(name, module) of the first importable binding in ``order`` (default: $SPARSEKD_CUDA_BINDING, else
    cuda-python then torch). Raises one clear error when none is installed."""
    forced = os.environ.get(ENV)
    if order is None:
        if forced and forced not in _IMPORTERS:
            raise CudaBindingError(f"{ENV}={forced!r}; choose from {', '.join(BINDINGS)}")
        order = (forced,) if forced else BINDINGS
    for name in order:
        try:
            return name, _IMPORTERS[name]()
        except ImportError:
            continue
    raise CudaBindingError(f"the TensorRT target needs a CUDA binding for device memory, and {' nor '.join(order)} "
                           "is installed here: pip install 'sparsekd-deploy[tensorrt]' (brings cuda-python)")


_cached: dict = {}


def backend():
    """The device-memory backend, chosen once per process."""
    if "backend" not in _cached:
        name, module = choose()
        _cached["backend"] = CudaPythonBackend(module) if name == "cuda-python" else TorchBackend(module)
    return _cached["backend"]


def device_facts() -> dict:
    """compute_capability, device_name and cuda_version of GPU 0 (None each when no binding or no GPU)."""
    facts = {"compute_capability": None, "device_name": None, "cuda_version": None}
    try:
        name, module = choose()
    except CudaBindingError:
        return facts
    try:
        return {**facts, **(_cudart_facts(module) if name == "cuda-python" else _torch_facts(module))}
    except (RuntimeError, OSError):  # a binding without a usable driver: no GPU to report
        return facts


def _torch_facts(torch) -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"compute_capability": "{}.{}".format(*torch.cuda.get_device_capability()),
            "device_name": torch.cuda.get_device_name(), "cuda_version": torch.version.cuda}


def _cudart_facts(cudart) -> dict:
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return {}
    err, prop = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        return {}
    name = prop.name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    facts = {"compute_capability": f"{prop.major}.{prop.minor}", "device_name": name}
    err, version = cudart.cudaRuntimeGetVersion()
    if err == cudart.cudaError_t.cudaSuccess:
        facts["cuda_version"] = f"{version // 1000}.{version % 1000 // 10}"
    return facts


class TorchBackend:
    """Device buffers as torch CUDA tensors (a build host's install)."""

    name = "torch"

    def __init__(self, torch):
        self.torch = torch
        self._stream = torch.cuda.Stream()

    def stream_handle(self) -> int:
        return self._stream.cuda_stream

    def synchronize(self) -> None:
        self._stream.synchronize()

    def empty(self, shape, dtype) -> object:
        return self.torch.empty(tuple(shape), dtype=getattr(self.torch, np.dtype(dtype).name), device="cuda")

    def from_host(self, array: np.ndarray) -> object:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to("cuda")

    def to_host(self, buf) -> np.ndarray:
        self.synchronize()
        return buf.cpu().numpy()


class CudaPythonBackend:
    """Device buffers through ``cudaMalloc`` / ``cudaMemcpyAsync`` on one stream (a lean device install)."""

    name = "cuda-python"

    def __init__(self, cudart):
        self.cudart = cudart
        self._stream = self.check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            _, text = self.cudart.cudaGetErrorString(err)
            raise CudaBindingError(f"{what} failed: {text.decode() if isinstance(text, bytes) else text}")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def stream_handle(self) -> int:
        return int(self._stream)

    def synchronize(self) -> None:
        self.check(self.cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def empty(self, shape, dtype) -> DeviceArray:
        return DeviceArray(self, tuple(int(d) for d in shape), np.dtype(dtype))

    def from_host(self, array: np.ndarray) -> DeviceArray:
        array = np.ascontiguousarray(array)
        buf = self.empty(array.shape, array.dtype)
        if buf.nbytes:
            self.check(self.cudart.cudaMemcpyAsync(buf.ptr, array.ctypes.data, buf.nbytes,
                                                   self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
                       "cudaMemcpyAsync (host to device)")
            self.synchronize()  # the host array may go away once this returns
        return buf

    def to_host(self, buf: DeviceArray) -> np.ndarray:
        out = np.empty(buf.shape, buf.dtype)
        if buf.nbytes:
            self.check(self.cudart.cudaMemcpyAsync(out.ctypes.data, buf.ptr, buf.nbytes,
                                                   self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                       "cudaMemcpyAsync (device to host)")
        self.synchronize()
        return out


class DeviceArray:
    """A ``cudaMalloc`` buffer with a shape and dtype, freed when dropped. Empty arrays hold no memory and report a
    null pointer, as torch does (``targets.tensorrt.tensor_address`` substitutes a live one)."""

    def __init__(self, owner: CudaPythonBackend, shape: tuple[int, ...], dtype: np.dtype):
        self.owner, self.shape, self.dtype = owner, shape, dtype
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.ptr = owner.check(owner.cudart.cudaMalloc(self.nbytes), "cudaMalloc") if self.nbytes else 0

    def data_ptr(self) -> int:
        return int(self.ptr)

    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def contiguous(self) -> DeviceArray:
        return self

    def __del__(self):
        if getattr(self, "ptr", 0):
            try:
                self.owner.cudart.cudaFree(self.ptr)
            except Exception:  # interpreter shutdown: the driver frees the context's memory anyway
                pass
            self.ptr = 0
