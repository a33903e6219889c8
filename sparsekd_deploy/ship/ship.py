"""Ship one bundle to one device: upload (resumable) → verify on the device → optional steps there → activate.

The order makes the promise: ``current`` is switched only after every file's sha256 matched on the device and every
requested step passed; anything else leaves the active release as it was.
"""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SparseKDError
from .layout import Layout, bundle_version, check_remote_path
from .lock import DeviceLock
from .releases import (
    activate,
    current_version,
    list_releases,
    now,
    remove_release,
    remove_stale_partials,
    to_remove,
    update_record,
)
from .remote import HostSpec, Remote, ShipError, local_identity
from .steps import StepResult, build_engine, check_device_tool, validate
from .upload import ShipFile, files_to_ship, upload_verified, verify_on_device


class ReleaseRefused(SparseKDError):
    """The device's copy failed its checks: the release was not activated."""

    exit_code = 1


@dataclass
class ShipOptions:
    path: str | None = None  # default: sparsekd/<bundle name> under the login's home
    build_engine: bool = False
    validate: bool = False
    runtime: str | None = None  # for --validate: default tensorrt with --build-engine, else onnxruntime
    remote_bin: str = "sparsekd-deploy"
    remote_trtexec: str | None = None  # default: trtexec on the PATH, else JetPack's /usr/src/tensorrt/bin/trtexec
    keep: int = 3


@dataclass
class ShipResult:
    host: str
    path: str
    version: str
    verdict: str  # activated | already-current | failed | refused | error
    steps: list[StepResult] = field(default_factory=list)
    bytes_total: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    message: str = ""
    notes: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (connect, upload+verify, steps, …)

    @property
    def ok(self) -> bool:
        return self.verdict in ("activated", "already-current")

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else (2 if self.verdict == "error" else 1)

    def to_dict(self) -> dict:
        return {"host": self.host, "path": self.path, "version": self.version, "verdict": self.verdict,
                "ok": self.ok, "steps": [s.to_dict() for s in self.steps], "bytes_total": self.bytes_total,
                "bytes_sent": self.bytes_sent, "seconds": round(self.seconds, 2), "message": self.message,
                "notes": self.notes, "removed": self.removed,
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


@dataclass
class LocalBundle:
    dir: Path
    manifest: dict
    version: str
    files: list[ShipFile]

    @classmethod
    def open(cls, path) -> LocalBundle:
        from ..bundle import Bundle

        b = Bundle.open(path)  # checksums verified here first: never ship a damaged bundle
        return cls(b.path, b.manifest, bundle_version(b.path), files_to_ship(b.path, b.manifest))

    @property
    def default_path(self) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(self.manifest.get("name") or "model")).strip(".-") or "model"
        return posixpath.join("sparsekd", name)

    @property
    def payload(self) -> list[ShipFile]:
        """What never changes on the device (steps there rewrite manifest.json, e.g. to add an engine)."""
        return [f for f in self.files if f.rel != "manifest.json"]


async def open_layout(remote: Remote, path: str, create: bool = True) -> Layout:
    """The device layout under ``path`` (created by a ship; ``create=False`` for read-only commands, which refuse a
    path no ship made rather than leave directories behind)."""
    import asyncssh

    path = check_remote_path(path)
    if create:
        await remote.sftp.makedirs(posixpath.join(path, "releases"), exist_ok=True)
    else:
        try:
            attrs = await remote.sftp.stat(path)
        except asyncssh.SFTPNoSuchFile:
            raise ShipError(f"{remote.spec.label}: {path} does not exist: nothing was ever shipped there") from None
        if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY or not await remote.sftp.isdir(posixpath.join(path,
                                                                                                       "releases")):
            raise ShipError(f"{remote.spec.label}: {path} is not a ship destination (no releases/ directory in it)")
    return Layout(await remote.sftp.realpath(path))


async def _check_current_is_ours(remote: Remote, layout: Layout) -> None:
    """``current`` must be the symlink ship manages (or absent) — found before anything is uploaded."""
    import asyncssh

    try:
        attrs = await remote.sftp.lstat(layout.current)
    except asyncssh.SFTPNoSuchFile:
        return
    if attrs.type != asyncssh.FILEXFER_TYPE_SYMLINK:
        kind = "a directory" if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY else "a file"
        raise ShipError(f"{remote.spec.label}: {layout.current} is {kind}, not the symlink ship switches; move it "
                        "away (ship makes current -> releases/<version> itself)")


async def ship_to(bundle: LocalBundle, spec: HostSpec, opts: ShipOptions,
                  progress: Callable[[int], None] = lambda n: None, after_upload: Callable | None = None) -> ShipResult:
    """Ship to one device; every outcome is a ShipResult (exceptions become verdict ``error`` / ``refused``)."""
    import asyncssh

    t0 = time.monotonic()
    result = ShipResult(spec.label, bundle.default_path if opts.path is None else opts.path, bundle.version, "error",
                        bytes_total=sum(f.bytes for f in bundle.files))
    phase = "connecting"
    remote = None
    clock = [time.monotonic()]

    def lap(name: str) -> None:
        now_ = time.monotonic()
        result.timings[name] = result.timings.get(name, 0.0) + now_ - clock[0]
        clock[0] = now_

    try:
        remote = await Remote.open(spec)
        lap("connect")
        phase = "preparing the device path"
        layout = await open_layout(remote, result.path)
        result.path = layout.root
        async with DeviceLock(remote, layout) as lock:
            if lock.previous_holder:
                result.notes.append(f"the previous ship here ({lock.previous_holder.get('holder')}, since "
                                    f"{lock.previous_holder.get('since')}) ended without finishing; its lock was "
                                    "released when its connection closed; an unfinished upload resumes")
            await _check_current_is_ours(remote, layout)
            phase = "checking the device's sparsekd-deploy"
            if opts.build_engine or opts.validate:
                result.steps.append(await check_device_tool(remote, opts.remote_bin, bundle.manifest))
            lap("lock")
            phase = "uploading"
            await _place_release(remote, layout, bundle, result, progress, after_upload)
            lap("upload_and_verify")
            phase = "running the steps on the device"
            live = await current_version(remote, layout) == bundle.version
            ok = await _run_steps(remote, layout, bundle, opts, result, live)
            lap("steps")
            if not ok:
                return result
            phase = "activating"
            if live:
                result.verdict = "already-current"
            else:
                await activate(remote, layout, bundle.version)
                result.verdict = "activated"
            lap("activate")
            phase = "removing old releases"
            for old in to_remove(await list_releases(remote, layout), opts.keep):
                await remove_release(remote, layout, old.version)
                result.removed.append(old.version)
            result.removed += await remove_stale_partials(remote, layout, keep=bundle.version)
            lap("retention")
    except ReleaseRefused as e:
        result.verdict, result.message = "refused", str(e)
    except ShipError as e:
        result.message = str(e)
    except (asyncssh.Error, OSError) as e:
        why = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
        if result.verdict in ("activated", "already-current"):
            # The switch happened; only the cleanup after it failed. Say so, and keep the verdict.
            result.notes.append(f"{why} while {phase}; the release is active, old releases may remain")
        else:
            result.message = (f"{spec.label}: {why} while {phase}; nothing was activated"
                              + ("; ship again to resume the upload" if phase == "uploading" else ""))
    finally:
        if remote is not None:
            await remote.close()
        result.seconds = time.monotonic() - t0
    return result


async def _place_release(remote: Remote, layout: Layout, bundle: LocalBundle, result: ShipResult, progress,
                         after_upload) -> None:
    """Make ``releases/<version>`` a whole, verified copy: upload a new one, or re-check one already there."""
    v = bundle.version
    if await remote.sftp.isdir(layout.release(v)):
        progress(result.bytes_total)
        bad = await verify_on_device(remote, layout.release(v), bundle.payload)
        if bad:
            raise ReleaseRefused(f"{remote.spec.label}: release {v} is already on the device but no longer matches "
                                 f"its checksums ({', '.join(bad)}); it was not activated. Delete "
                                 f"{layout.release(v)} on the device, then ship again")
        result.notes.append(f"release {v} was already on the device (verified again, nothing sent)")
        return
    stats = await upload_verified(remote, bundle.dir, bundle.files, layout.partial(v), progress, after_upload)
    result.bytes_sent = stats.bytes_sent
    if stats.kept or stats.resumed:
        result.notes.append(f"resumed an earlier upload: {len(stats.kept)} file(s) already complete, "
                            f"{len(stats.resumed)} continued")
    # The record first: a release dir without one would read as "unknown" if the link died between the two.
    await update_record(remote, layout, v, status="verified", shipped_at=now(), shipped_by=local_identity(),
                        bundle=bundle.manifest.get("name"), steps=[], validation=None)
    await remote.sftp.posix_rename(layout.partial(v), layout.release(v))


async def _run_steps(remote: Remote, layout: Layout, bundle: LocalBundle, opts: ShipOptions,
                     result: ShipResult, live: bool) -> bool:
    """Run the requested steps in the release; on a failure mark it failed (logs beside it) and return False.

    The live release is never rebuilt nor relabelled: an engine build there is refused, and a failing re-validation
    of it is reported (exit 1) with the release left current and its status untouched — the user decides to roll
    back."""
    from .remote import read_json

    v = bundle.version
    record = await read_json(remote, layout.record(v)) or {}
    if live and opts.build_engine:
        raise ReleaseRefused(f"{remote.spec.label}: release {v} is live; its engine is not rebuilt in place. Ship a "
                             "rebuilt bundle, or roll back first")
    if record.get("status") == "failed" and not (opts.build_engine or opts.validate):
        raise ReleaseRefused(f"{remote.spec.label}: release {v} failed its steps on this device before; ship it with "
                             "the steps again (--validate / --build-engine) to re-check it — it does not go live "
                             "unchecked")
    steps = []
    if opts.build_engine:
        steps.append(lambda: build_engine(remote, layout, v, opts.remote_bin, opts.remote_trtexec))
    if opts.validate:
        runtime = opts.runtime or ("tensorrt" if opts.build_engine else "onnxruntime")
        steps.append(lambda: validate(remote, layout, v, opts.remote_bin, runtime, bundle.manifest))
    for run in steps:
        step = await run()
        result.steps.append(step)
        if step.name == "validate":
            await update_record(remote, layout, v, validation={"passed": step.ok, "summary": step.summary,
                                                               "at": now()})
        if not step.ok:
            result.verdict = "failed"
            if live:
                result.message = (f"{remote.spec.label}: the LIVE release {v} failed {step.name} on the device "
                                  f"({step.summary}); it stays current — `sparsekd-deploy rollback` switches back; "
                                  f"output in {step.log}")
                return False
            await update_record(remote, layout, v, status="failed", steps=[s.to_dict() for s in result.steps])
            result.message = (f"{remote.spec.label}: step {step.name} failed on the device ({step.summary}); "
                              f"`current` is unchanged; output kept in {step.log}")
            return False
    if not live:
        await update_record(remote, layout, v, status="ready", steps=[s.to_dict() for s in result.steps])
    return True
