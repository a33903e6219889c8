"""The optional steps run on the device by its own sparsekd-deploy: build the engine there, validate there.

A step's full output is kept beside the release (``<version>.<step>.log``); its verdict is its exit status.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass

from .. import __version__
from .layout import Layout
from .remote import Remote, ShipError

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")
INSTALL_HINT = ("install it there with `python3 -m pip install 'sparsekd-deploy[device]=={v}'` (add the `tensorrt` "
                "extra for engine builds; `[gpu]` for onnxruntime-gpu), or name its path with --remote-bin "
                "(e.g. a venv's bin/sparsekd-deploy)")


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float
    exit_status: int | None
    summary: str  # one line for the table
    log: str | None = None  # where the full output lies on the device

    def to_dict(self) -> dict:
        return asdict(self)


def _parse_version(text: str) -> tuple[int, int, int] | None:
    m = _VERSION.search(text or "")
    return tuple(int(x) for x in m.groups()) if m else None


def needed_version(manifest: dict) -> tuple[int, int, int]:
    """The device's tool must be at least as new as the one that wrote the bundle (an older one may not read it)."""
    return _parse_version(str(manifest.get("tool", ""))) or _parse_version(__version__)


async def check_device_tool(remote: Remote, remote_bin: str, manifest: dict) -> StepResult:
    t0 = time.monotonic()
    need = needed_version(manifest)
    want = ".".join(map(str, need))
    done = await remote.run([remote_bin, "--version"])
    if done.exit_status == 127:
        raise ShipError(f"{remote.spec.label}: `{remote_bin}` is not installed on the device (not on its PATH); "
                        + INSTALL_HINT.format(v=want))
    have = _parse_version(done.stdout) if done.exit_status == 0 else None
    if have is None:
        raise ShipError(f"{remote.spec.label}: `{remote_bin} --version` failed on the device "
                        f"({(done.stderr or done.stdout or '').strip()[:200]}); " + INSTALL_HINT.format(v=want))
    if have < need:
        raise ShipError(f"{remote.spec.label}: the device's sparsekd-deploy is {'.'.join(map(str, have))}, older than "
                        f"the {want} that wrote this bundle; upgrade: " + INSTALL_HINT.format(v=want))
    return StepResult("device-tool", True, time.monotonic() - t0, 0, f"sparsekd-deploy {'.'.join(map(str, have))}")


async def _run_step(remote: Remote, layout: Layout, version: str, name: str, argv: list[str],
                    timeout: float) -> tuple[StepResult, str]:
    t0 = time.monotonic()
    done = await remote.run(argv, timeout=timeout)
    output = f"$ {' '.join(argv)}\n--- stdout ---\n{done.stdout or ''}\n--- stderr ---\n{done.stderr or ''}"
    log = layout.log(version, name)
    async with remote.sftp.open(log, "wb") as f:
        await f.write(output.encode())
    last = (done.stderr or done.stdout or "").strip().splitlines()
    ok = done.exit_status == 0
    return StepResult(name, ok, time.monotonic() - t0, done.exit_status,
                      "ok" if ok else (last[-1][:160] if last else f"exit {done.exit_status}"), log), done.stdout or ""


async def build_engine(remote: Remote, layout: Layout, version: str, remote_bin: str,
                       timeout: float = 3600) -> StepResult:
    step, _ = await _run_step(remote, layout, version, "engine-build",
                              [remote_bin, "engine", "build", layout.release(version)], timeout)
    return step


def gate_flags(manifest: dict) -> list[str]:
    """The bundle's recorded gates as validate flags (``max_kl: 0.25`` → ``--max-kl 0.25``)."""
    flags = []
    for key, value in sorted((manifest.get("gates") or {}).items()):
        if re.fullmatch(r"(max|min)_[a-z0-9_]+", key) and isinstance(value, (int, float)) and not isinstance(value, bool):
            flags += ["--" + key.replace("_", "-"), repr(float(value))]
    return flags


async def validate(remote: Remote, layout: Layout, version: str, remote_bin: str, runtime: str, manifest: dict,
                   timeout: float = 3600) -> StepResult:
    argv = [remote_bin, "validate", layout.release(version), "--runtime", runtime, "--json", *gate_flags(manifest)]
    step, stdout = await _run_step(remote, layout, version, "validate", argv, timeout)
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return step
    failed = [g["gate"] for g in report.get("gates", []) if not g.get("passed")]
    m = report.get("metrics", {})
    kl = m.get("kl_topk")
    step.summary = ("PASS" if report.get("passed") else f"FAIL ({', '.join(failed)})") + (
        f" kl_topk={kl:.4f}" if isinstance(kl, (int, float)) else "")
    return step
