"""Resumable upload of a bundle into ``releases/<version>.partial`` and verification of every sha256 on the device.

Resuming: a file already on the device with the full size is kept, a shorter one is continued from its length, a
longer one is sent again. Nothing is trusted on size alone: after the upload the device hashes every file
(``sha256sum``, coreutils) and the result is compared with the manifest. A file kept or continued from an earlier
attempt that fails the check is sent again in full, once; a file sent in full by this upload that still fails is
refused (the device's storage or the link is corrupting data, and retrying would hide it).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .remote import Remote, ShipError, shell_line

CHUNK = 8 << 20  # bytes read locally per SFTP write; asyncssh splits each into parallel requests


@dataclass(frozen=True)
class ShipFile:
    rel: str
    bytes: int
    sha256: str


def files_to_ship(bundle_dir: Path, manifest: dict) -> list[ShipFile]:
    """The manifest's files and the manifest itself (the mutable records of the build host — its own validation
    report — stay behind: the device validates for itself)."""
    from ..digests import sha256_file

    files = [ShipFile(rel, int(meta["bytes"]), meta["sha256"]) for rel, meta in manifest["files"].items()]
    mf = bundle_dir / "manifest.json"
    files.append(ShipFile("manifest.json", mf.stat().st_size, sha256_file(mf)))
    for f in files:
        if "\\" in f.rel or f.rel.startswith("-") or any(ord(c) < 32 for c in f.rel):
            raise ShipError(f"cannot ship a file named {f.rel!r} (a backslash, control character or leading '-')")
    return files


@dataclass
class UploadStats:
    bytes_total: int = 0
    bytes_sent: int = 0
    kept: list[str] = field(default_factory=list)  # complete from an earlier attempt
    resumed: list[str] = field(default_factory=list)  # continued from an offset
    resent: list[str] = field(default_factory=list)  # failed verification, sent again


async def _remote_size(remote: Remote, path: str) -> int | None:
    import asyncssh

    try:
        return (await remote.sftp.stat(path)).size
    except asyncssh.SFTPNoSuchFile:
        return None


async def _check_free_space(remote: Remote, dest_dir: str, needed: int) -> None:
    """Refuse before sending what the device's file system cannot hold (a full disk mid-upload is worse)."""
    import asyncssh

    try:
        vfs = await remote.sftp.statvfs(dest_dir)
    except asyncssh.SFTPError:  # a server without statvfs@openssh.com: the upload itself will say
        return
    free = vfs.bavail * vfs.frsize
    if needed > free:
        raise ShipError(f"{remote.spec.label}: {dest_dir} has {free / 1e6:.1f} MB free; the upload needs "
                        f"{needed / 1e6:.1f} MB more; free space there (or remove old releases) and ship again")


async def _send(remote: Remote, local: Path, dest: str, offset: int, progress: Callable[[int], None]) -> int:
    from asyncssh import FXF_CREAT, FXF_TRUNC, FXF_WRITE

    flags = FXF_WRITE | FXF_CREAT | (FXF_TRUNC if offset == 0 else 0)
    sent = 0
    async with remote.sftp.open(dest, flags, encoding=None) as f:
        with open(local, "rb") as src:
            src.seek(offset)
            while chunk := src.read(CHUNK):
                await f.write(chunk, offset + sent)
                sent += len(chunk)
                progress(len(chunk))
    return sent


async def upload(remote: Remote, bundle_dir: Path, files: list[ShipFile], dest_dir: str,
                 progress: Callable[[int], None] = lambda n: None) -> tuple[UploadStats, set[str]]:
    """Send what the device lacks; also returns the files sent in full (from offset 0) by this call."""
    stats = UploadStats(bytes_total=sum(f.bytes for f in files))
    dirs = sorted({posixpath.dirname(posixpath.join(dest_dir, f.rel)) for f in files})
    for d in dirs:
        await remote.sftp.makedirs(d, exist_ok=True)
    sizes = {f.rel: await _remote_size(remote, posixpath.join(dest_dir, f.rel)) for f in files}
    await _check_free_space(remote, dest_dir, sum(f.bytes - min(sizes[f.rel] or 0, f.bytes) for f in files))
    sent_in_full = set()
    for f in files:
        dest = posixpath.join(dest_dir, f.rel)
        have = sizes[f.rel]
        if have == f.bytes:
            stats.kept.append(f.rel)
            progress(f.bytes)
            continue
        offset = have if have is not None and have < f.bytes else 0
        if offset:
            stats.resumed.append(f.rel)
            progress(offset)
        else:
            sent_in_full.add(f.rel)
        stats.bytes_sent += await _send(remote, bundle_dir / f.rel, dest, offset, progress)
    return stats, sent_in_full


# OpenSSL's sha256 uses the CPU's SHA extensions (SHA-NI, ARMv8 crypto on Jetson) and runs several times faster
# than coreutils' sha256sum; both print "<hex> [*]<name>". The script is a fixed literal; file names are arguments.
_HASH_SCRIPT = ('if command -v openssl >/dev/null 2>&1; then exec openssl dgst -sha256 -r "$@"; '
                'else exec sha256sum -- "$@"; fi')


async def device_sha256(remote: Remote, dest_dir: str, rels: list[str]) -> dict[str, str]:
    """sha256 of each file as the device reads it back from its storage (absent files are missing from the answer)."""
    line = shell_line(["cd", dest_dir]) + " && " + shell_line(["sh", "-c", _HASH_SCRIPT, "sh", *rels])
    done = await remote.conn.run(line, check=False)
    if done.exit_status is None:  # killed, or the link died: nothing can be concluded about the files
        raise ShipError(f"{remote.spec.label}: the connection was lost while the device hashed the upload; nothing "
                        "was activated; ship again to finish")
    if done.exit_status == 127:
        raise ShipError(f"{remote.spec.label}: the device has neither `openssl` nor `sha256sum`; cannot verify the "
                        "upload")
    out = {}
    for row in (done.stdout or "").splitlines():
        digest, _, name = row.partition(" ")
        out[name[1:] if name.startswith(("*", " ")) else name] = digest
    return out


async def verify_on_device(remote: Remote, dest_dir: str, files: list[ShipFile]) -> list[str]:
    """The files whose device-side sha256 differs from the manifest (or that are missing)."""
    got = await device_sha256(remote, dest_dir, [f.rel for f in files])
    return [f.rel for f in files if got.get(f.rel) != f.sha256]


async def upload_verified(remote: Remote, bundle_dir: Path, files: list[ShipFile], dest_dir: str,
                          progress: Callable[[int], None] = lambda n: None,
                          after_upload: Callable | None = None) -> UploadStats:
    """Upload, verify on the device, re-send what an earlier attempt left damaged; ``ShipError`` if a file sent in
    full here fails verification. ``after_upload`` (tests) runs between the upload and the check."""
    stats, sent_in_full = await upload(remote, bundle_dir, files, dest_dir, progress)
    if after_upload is not None:
        await after_upload()
    bad = await verify_on_device(remote, dest_dir, files)
    fresh_bad = [rel for rel in bad if rel in sent_in_full]
    if fresh_bad:
        raise ShipError(f"{remote.spec.label}: checksum mismatch on the device for {', '.join(fresh_bad)} right after "
                        "sending it; the release was not activated (the device's storage or the link corrupts data)")
    if bad:
        by_rel = {f.rel: f for f in files}
        for rel in bad:
            stats.resent.append(rel)
            stats.bytes_sent += await _send(remote, bundle_dir / rel, posixpath.join(dest_dir, rel), 0, progress)
        still = await verify_on_device(remote, dest_dir, [by_rel[r] for r in bad])
        if still:
            raise ShipError(f"{remote.spec.label}: checksum mismatch on the device for {', '.join(still)} after "
                            "sending it again; the release was not activated")
    return stats
