"""Engine portability: engines are tied to the TensorRT version and the GPU architecture that built them.

The manifest records both; loading refuses a mismatch *before* deserialisation, naming both sides. The plan
file's own header is read too: TensorRT ≥ 8.6 stores its major.minor.patch at bytes 24–26 (layout described by
NVIDIA engineers in TensorRT issue #3073; there is no public API), older plans a serialization tag at byte 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SparseKDError


class EngineMismatchError(SparseKDError):
    pass


@dataclass
class PlanHeader:
    trt_version: tuple[int, int, int] | None
    serialization_tag: int

    @property
    def version_str(self) -> str | None:
        return ".".join(map(str, self.trt_version)) if self.trt_version else None


def read_plan_header(data: bytes | Path) -> PlanHeader:
    if isinstance(data, Path):
        with open(data, "rb") as f:
            data = f.read(32)
    if len(data) < 28:
        raise EngineMismatchError(f"engine file is {len(data)} bytes: too short to be a TensorRT plan")
    major, minor, patch = data[24], data[25], data[26]
    plausible = 8 <= major <= 20 and minor < 100 and patch < 100
    return PlanHeader((major, minor, patch) if plausible else None, int.from_bytes(data[8:12], "little"))


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def check_compat(engine: dict, runtime: dict) -> None:
    """``engine``: the manifest's engine record; ``runtime``: this machine (tensorrt_version, compute_capability...)."""
    problems = []
    built, here = engine.get("tensorrt_version"), runtime.get("tensorrt_version")
    if built and here and version_tuple(built) != version_tuple(here):
        same_major_newer = version_tuple(built)[0] == version_tuple(here)[0] and version_tuple(here) >= version_tuple(built)
        if not (engine.get("version_compatible") and same_major_newer):
            problems.append(f"TensorRT {built} built it, this machine has TensorRT {here}")
    cc_built, cc_here = engine.get("compute_capability"), runtime.get("compute_capability")
    if cc_built and cc_here and cc_built != cc_here:
        ampere_plus = engine.get("hardware_compatibility") == "ampere+" and float(cc_here) >= 8.0
        if not ampere_plus:
            problems.append(f"it targets compute capability {cc_built} ({engine.get('device_name', '?')}), this GPU is "
                            f"{cc_here} ({runtime.get('device_name', '?')})")
    if problems:
        raise EngineMismatchError(
            "engine does not fit this machine: " + "; ".join(problems)
            + ". Rebuild it here with `sparsekd-deploy engine build BUNDLE`"
        )


def check_plan_file(path: Path, engine: dict) -> PlanHeader:
    """The header must agree with the manifest (a swapped or stale engine.plan is refused)."""
    header = read_plan_header(path)
    if header.trt_version and engine.get("tensorrt_version"):
        if header.trt_version != version_tuple(engine["tensorrt_version"]):
            raise EngineMismatchError(f"{path.name} header says TensorRT {header.version_str}, the manifest says "
                                      f"{engine['tensorrt_version']}: the plan was replaced or the manifest is stale")
    return header


def this_machine() -> dict:
    """TensorRT version, compute capability and CUDA version here (empty values where absent)."""
    info: dict = {"tensorrt_version": None, "compute_capability": None, "cuda_version": None, "device_name": None}
    try:
        import tensorrt as trt

        info["tensorrt_version"] = trt.__version__
    except ImportError:
        pass
    from ..cuda_memory import device_facts  # cuda-python on a lean device install, else torch

    info.update(device_facts())
    return info


def compute_capability(device=None) -> str:
    """The CUDA device's compute capability as the manifest writes it ("8.7")."""
    import torch

    return "{}.{}".format(*torch.cuda.get_device_capability(device))


def sparse_tensor_cores(compute_capability: str | None) -> bool:
    """2:4 sparse tensor cores exist from Ampere (8.0) on."""
    return bool(compute_capability) and float(compute_capability) >= 8.0
