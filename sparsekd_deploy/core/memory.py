"""Peak memory of a stretch of a run (one stage), as the stage record carries it, and giving memory back.

On a CUDA device: ``torch.cuda.max_memory_allocated`` since the last reset (tensor memory on that device). On the CPU
torch has no allocator statistics (and ``tracemalloc`` does not see its allocations), so the peak is the process's
resident-set high-water mark, ``VmHWM`` in ``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``
(Linux ≥ 4.0). It counts everything the process holds — libraries, the Python heap, the teacher if it is in
memory — which is what a machine has to provide. Where the reset is refused the peak is since the process started,
and the record says so.
"""

from __future__ import annotations

import contextlib
import gc
import re
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _hwm_kib() -> int | None:
    try:
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """``reset()`` at the start of a stretch, ``read()`` at its end → {"peak_memory_mb": ..., "peak_memory_kind": ...}."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = None
        self.start_mb = None  # memory held when the stretch began (the peak's floor)

    def reset(self) -> None:
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
        return {"peak_memory_mb": r(mb), "start_memory_mb": r(self.start_mb), "peak_memory_kind": self.kind}


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
