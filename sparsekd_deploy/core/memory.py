"""Peak memory of a stretch of a run (one stage), as the stage record carries it, and giving memory back.

On a CUDA device: ``torch.cuda.max_memory_allocated`` since the last reset (tensor memory on that device). On the CPU
torch has no allocator statistics (and ``tracemalloc`` does not see its allocations), so the peak is the process's
resident-set high-water mark, ``VmHWM`` in ``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``
(Linux ≥ 4.0). It counts everything the process holds — libraries, the Python heap, the teacher if it is in
memory — which is what a machine has to provide. Where the reset is refused the peak is since the process started,
and the record says so.

The CPU twin of ``max_memory_allocated`` (tensor memory only, no libraries, Python heap or file pages) is opt-in:
``PeakMemory(device, tensor_steps=N)`` also records ``peak_tensor_mb``, the high-water mark of the bytes of all live
CPU tensor storages (:class:`TensorBytes`), from the reset through the stretch's first N optimizer steps. Tracking
costs a Python call per operator, so it is a measurement tool (``scripts/bench_topk_cache.py``), not on by default;
N steps suffice because every training step of a stage has the same shapes, and so the same peak.
"""

from __future__ import annotations

import contextlib
import gc
import re
import warnings
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _hwm_kib() -> int | None:
    try:
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _is_fake(t: torch.Tensor) -> bool:
    """A fake tensor (shapes only, from a torch.export / dynamo trace earlier in the process) holds no memory."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def live_cpu_storages() -> list[torch.UntypedStorage]:
    """Every distinct storage of a CPU tensor that Python objects hold now (found through the garbage collector,
    which tracks tensors): parameters, gradients, optimizer moments, buffers, data. Tensors held only by C++ (an
    autograd graph's saved tensors) are not seen: call it between steps."""
    gc.collect()
    seen: dict[int, torch.UntypedStorage] = {}
    with warnings.catch_warnings():  # isinstance on some lazily deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu" or obj.is_sparse or _is_fake(obj):
                continue
            try:
                st = obj.untyped_storage()
                if st.nbytes():
                    seen.setdefault(st.data_ptr(), st)
            # tensor subclasses without a real storage or data pointer (the fake tensors a dynamo trace leaves in the
            # process: seen after an ONNX export earlier in the same test session)
            except (RuntimeError, NotImplementedError):
                continue
    return list(seen.values())


class TensorBytes(TorchDispatchMode):
    """While active: the bytes of the live CPU tensor storages, those alive at the start (``live_cpu_storages``) plus
    every one an operator creates, each dropped when it is freed (a weak reference); ``peak`` is their high-water mark
    — on the CPU what ``torch.cuda.max_memory_allocated`` is on a GPU. Operator-internal scratch buffers are not seen
    (on a GPU they are); tensors made without an operator (``torch.from_numpy``) are not either."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = self.peak = 0
        for st in live_cpu_storages():
            self._add(st)
        self.start = self.peak = self.current

    def _add(self, st: torch.UntypedStorage) -> None:
        key, n = st.data_ptr(), st.nbytes()
        if not n or key in self._live:
            return

        def freed(ref, key=key, n=n):
            if self._live.get(key, (None,))[0] is ref:
                del self._live[key]
                self.current -= n

        self._live[key] = (weakref.ref(st, freed), n)
        self.current += n
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_sparse:
                self._add(t.untyped_storage())
        return out


class PeakMemory:
    """``reset()`` at the start of a stretch, ``read()`` at its end → {"peak_memory_mb": ..., "peak_memory_kind": ...}.

    ``tensor_steps`` > 0 on the CPU: also the tensor-memory peak (:class:`TensorBytes`) over the reset and the first
    ``tensor_steps`` optimizer steps after it → ``peak_tensor_mb``, ``start_tensor_mb``, ``tensor_steps``."""

    def __init__(self, device: torch.device | str, tensor_steps: int = 0):
        self.device = torch.device(device)
        self.kind = None
        self.start_mb = None  # memory held when the stretch began (the peak's floor)
        self.tensor_steps = tensor_steps if self.device.type == "cpu" else 0
        self._tensors: TensorBytes | None = None
        self._tensor_result: dict = {}
        self._hook = None
        self._steps = 0

    def _start_tensors(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._stop_tensors()
        self._steps = 0
        self._tensors = TensorBytes()
        self._tensors.__enter__()

        def after_step(_optimizer, _args, _kwargs):
            self._steps += 1
            if self._steps >= self.tensor_steps:
                self._stop_tensors()

        self._hook = register_optimizer_step_post_hook(after_step)

    def _stop_tensors(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._tensors is not None:
            self._tensors.__exit__(None, None, None)
            r = lambda v: round(v / 2**20, 1)  # noqa: E731
            self._tensor_result = {"peak_tensor_mb": r(self._tensors.peak), "start_tensor_mb": r(self._tensors.start),
                                   "tensor_steps": self._steps}
            self._tensors = None

    def reset(self) -> None:
        if self.tensor_steps:
            self._start_tensors()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            CLEAR_REFS.write_text("5")
            self.kind = "process_peak_rss"
        except OSError:
            self.kind = "process_peak_rss_since_start"
        kib = _hwm_kib() if self.kind == "process_peak_rss" else None  # right after the reset: the current RSS
        self.start_mb = None if kib is None else kib / 1024

    def read(self) -> dict:
        """``peak_memory_mb``: the peak since ``reset``; ``start_memory_mb``: what was held at the reset."""
        if self.device.type == "cuda":
            mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            kib = _hwm_kib()
            mb = None if kib is None else kib / 1024
        r = lambda v: None if v is None else round(v, 1)  # noqa: E731
        self._stop_tensors()
        return {"peak_memory_mb": r(mb), "start_memory_mb": r(self.start_mb), "peak_memory_kind": self.kind,
                **self._tensor_result}


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere a no-op), so that
    a model just dropped (the teacher, once its top-K cache is written) leaves the resident set, not only the heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def available_bytes(device: torch.device | str) -> int | None:
    """Memory a new allocation can take here: free CUDA memory on a GPU, ``MemAvailable`` on a Linux CPU; None when
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None
