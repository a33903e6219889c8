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
from .remote import Remote, ShipError, shell_line

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


_BUSY = 75  # flock -E: a step of an earlier ship still runs


@dataclass
class _Done:
    """What a remote command left: its exit status (None: it did not finish) and output."""

    exit_status: int | None
    stdout: str
    stderr: str


async def _exec(remote: Remote, argv: list[str], timeout: float, cwd: str | None = None,
                layout: Layout | None = None, redirect: str | None = None) -> tuple[_Done, str]:
    """Run ``argv`` on the device (in ``cwd``; under the steps lock when ``layout`` is given; stdout+stderr into the
    file ``redirect`` there). A timeout or a lost connection is an unfinished step, never an exception."""
    import asyncssh

    words = ["flock", "-n", "-E", str(_BUSY), layout.steps_lock, *argv] if layout is not None else argv
    line = (shell_line(["cd", cwd]) + " && " if cwd else "") + shell_line(words)
    if redirect:
        line += " > " + shell_line([redirect]) + " 2>&1"
    shown = " ".join(argv) + (f" > {redirect} 2>&1" if redirect else "")
    try:
        run = await remote.conn.run(line, check=False, timeout=timeout)
        done = _Done(run.exit_status, run.stdout or "", run.stderr or "")
    except asyncssh.TimeoutError:
        done = _Done(None, "", f"timed out after {timeout:g} s on the device")
    if layout is not None and done.exit_status == _BUSY:
        done.stderr += ("\na step of an earlier ship (whose connection died) is still running in this path on the "
                        "device; wait for it to finish, then ship again")
    return done, f"$ {shown}\nexit {done.exit_status}\n--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}\n"


async def _finish(remote: Remote, layout: Layout, version: str, name: str, t0: float, done, log_text: str,
                  summary_ok: str = "ok") -> StepResult:
    log = layout.log(version, name)
    async with remote.sftp.open(log, "wb") as f:
        await f.write(log_text.encode())
    last = (done.stderr or done.stdout or "").strip().splitlines()
    ok = done.exit_status == 0
    return StepResult(name, ok, time.monotonic() - t0, done.exit_status,
                      summary_ok if ok else (last[-1][:160] if last else f"exit {done.exit_status}"), log)


async def _run_step(remote: Remote, layout: Layout, version: str, name: str, argv: list[str],
                    timeout: float) -> tuple[StepResult, str]:
    t0 = time.monotonic()
    done, text = await _exec(remote, argv, timeout, layout=layout)
    return await _finish(remote, layout, version, name, t0, done, text), done.stdout or ""


# JetPack installs trtexec here, off the PATH.
TRTEXEC_CANDIDATES = ("trtexec", "/usr/src/tensorrt/bin/trtexec")
_TRT_BANNER = re.compile(r"TensorRT v(\d+)")


async def _find_trtexec(remote: Remote, given: str | None) -> str | None:
    for cand in ([given] if given else TRTEXEC_CANDIDATES):
        done = await remote.run(["sh", "-c", 'command -v "$1"', "sh", cand])
        if done.exit_status == 0 and (done.stdout or "").strip():
            return done.stdout.strip().splitlines()[0]
    return None


def _trtexec_major(banner: str) -> int | None:
    """trtexec prints ``TensorRT v101601`` (10.16.1) or, before 10, ``v8601`` (8.6.1)."""
    m = _TRT_BANNER.search(banner or "")
    if not m:
        return None
    n = int(m.group(1))
    return n // 10000 if n >= 100000 else n // 1000


async def build_engine(remote: Remote, layout: Layout, version: str, remote_bin: str, trtexec: str | None = None,
                       timeout: float = 3600) -> StepResult:
    """The bundle's engine-build step on the device: its Python builder (``engine build``, needs TensorRT's Python
    package); where that fails and the device has ``trtexec`` (JetPack ships it without the Python package in every
    venv), the bundle's recorded trtexec line for the device's TensorRT major, then ``engine add``."""
    from .remote import read_json

    t0 = time.monotonic()
    release = layout.release(version)
    done, log = await _exec(remote, [remote_bin, "engine", "build", release], timeout, layout=layout)
    if done.exit_status == 0:
        return await _finish(remote, layout, version, "engine-build", t0, done, log, "built by the Python builder")
    path = await _find_trtexec(remote, trtexec)
    recipe = await read_json(remote, release + "/engine_build.json")
    if path is None or recipe is None:
        why = "no trtexec on the device" if path is None else "the bundle has no engine_build.json"
        return await _finish(remote, layout, version, "engine-build", t0, done, log + f"\n(no fallback: {why})\n")
    probe, text = await _exec(remote, [path], 60)
    log += "\n" + text
    major = _trtexec_major((probe.stdout or "") + (probe.stderr or ""))
    key = "trtexec_tensorrt11" if major is not None and major >= 11 else "trtexec_tensorrt10"
    line, register = recipe.get(key), recipe.get("trtexec_register")
    if not (isinstance(line, list) and isinstance(register, list) and all(isinstance(a, str) for a in line + register)):
        return await _finish(remote, layout, version, "engine-build", t0, done,
                             log + f"\n(no fallback: engine_build.json lacks {key} / trtexec_register)\n")
    # trtexec's output is the log `engine add` reads (its sparsity lines, device, precision): captured into the file.
    built, text = await _exec(remote, [path, *line[1:]], timeout, cwd=release, layout=layout, redirect="trtexec.log")
    log += "\n" + text
    if built.exit_status != 0:
        return await _finish(remote, layout, version, "engine-build", t0, built, log)
    args = [remote_bin, *[release if a == "<BUNDLE>" else a for a in register[1:]]]
    added, text = await _exec(remote, args, timeout, cwd=release, layout=layout)
    return await _finish(remote, layout, version, "engine-build", t0, added, log + "\n" + text,
                         f"built by trtexec (TensorRT {major}) + engine add")


def gate_flags(manifest: dict) -> list[str]:
    """The bundle's recorded gates as validate flags (``max_kl: 0.25`` → ``--max-kl 0.25``)."""
    from ..validate.gate import validate_flags

    return validate_flags(manifest.get("gates") or {})


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
