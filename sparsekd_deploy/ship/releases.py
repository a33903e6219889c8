"""Releases on a device: their records, the atomic switch of ``current``, rollback and retention."""

from __future__ import annotations

import datetime as _dt
import posixpath
from dataclasses import dataclass

from .layout import Layout, check_version
from .remote import Remote, ShipError, read_json, write_json


def now() -> str:
    # Microseconds: activation history and shipping order are read from these stamps, and two ships to one path can
    # finish within the same second (seconds made "the previous release" a tie, broken arbitrarily).
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


@dataclass
class Release:
    version: str
    record: dict  # status (verified | ready | failed), shipped_at, steps, activated_at, validation
    current: bool = False

    @property
    def status(self) -> str:
        return self.record.get("status", "unknown")

    @property
    def last_activated(self) -> str:
        return max(self.record.get("activated_at") or [""])

    def to_dict(self) -> dict:
        return {"version": self.version, "current": self.current, "status": self.status,
                "shipped_at": self.record.get("shipped_at"), "bundle": self.record.get("bundle"),
                "validation": self.record.get("validation"), "activated_at": self.record.get("activated_at", []),
                "steps": self.record.get("steps", [])}


async def current_version(remote: Remote, layout: Layout) -> str | None:
    import asyncssh

    try:
        target = await remote.sftp.readlink(layout.current)
    except asyncssh.SFTPError:
        return None
    return posixpath.basename(target.rstrip("/")) or None


async def list_releases(remote: Remote, layout: Layout) -> list[Release]:
    """Whole releases (not uploads in progress), oldest shipped first."""
    import asyncssh

    try:
        names = await remote.sftp.listdir(layout.releases)
    except asyncssh.SFTPNoSuchFile:
        return []
    cur = await current_version(remote, layout)
    out = []
    for name in names:
        if name.startswith("v-") and "." not in name and await remote.sftp.isdir(posixpath.join(layout.releases, name)):
            record = await read_json(remote, layout.record(name)) or {"status": "unknown"}
            out.append(Release(name, record, current=name == cur))
    return sorted(out, key=lambda r: (r.record.get("shipped_at") or "", r.version))


async def update_record(remote: Remote, layout: Layout, version: str, **fields) -> dict:
    record = await read_json(remote, layout.record(version)) or {"version": version}
    record.update(fields)
    await write_json(remote, layout.record(version), record)
    return record


async def activate(remote: Remote, layout: Layout, version: str) -> None:
    """Point ``current`` at the release in one step: a new symlink beside it, renamed over the old one
    (rename(2) replaces atomically, so a reader sees the old release or the new one, never neither).

    The activation is recorded *before* the switch: if the link dies between the two, the history names a release
    that may not have become current (harmless: ``previous_of`` skips the current one), never the reverse — a live
    release without history, which retention would then not protect."""
    import asyncssh

    check_version(version)
    record = await read_json(remote, layout.record(version)) or {"version": version}
    record["activated_at"] = [*record.get("activated_at", []), now()]
    await write_json(remote, layout.record(version), record)
    tmp = layout.current + ".new"
    try:
        await remote.sftp.remove(tmp)
    except asyncssh.SFTPNoSuchFile:
        pass
    await remote.sftp.symlink(posixpath.join("releases", version), tmp)
    await remote.sftp.posix_rename(tmp, layout.current)


def previous_of(releases: list[Release]) -> Release | None:
    """The release that was live before the current one: the most recently activated other than the current one,
    whatever its status since (activation history, not status, says what ran)."""
    candidates = [r for r in releases if not r.current and r.record.get("activated_at")]
    return max(candidates, key=lambda r: r.last_activated, default=None)


def rollback_target(releases: list[Release], to: str | None) -> Release:
    """Only a release whose steps all passed (status ``ready``) can become current again."""
    by_version = {r.version: r for r in releases}
    if to is not None:
        check_version(to)
        if to not in by_version:
            raise ShipError(f"no release {to} on the device (there are: {', '.join(by_version) or 'none'})")
        target = by_version[to]
    else:
        target = previous_of(releases)
        if target is None:
            raise ShipError("nothing to roll back to: no earlier release was ever active on this path")
    if target.status == "failed":
        raise ShipError(f"release {target.version} failed its steps on the device; it cannot become current "
                        f"(its logs are beside it)")
    if target.status != "ready":
        raise ShipError(f"release {target.version} never completed its steps on the device (status "
                        f"{target.status}); ship it again to finish them")
    return target


def to_remove(releases: list[Release], keep: int) -> list[Release]:
    """Beyond the newest ``keep`` shipped, oldest first — never the current release nor the previous one."""
    protected = {r.version for r in releases if r.current}
    if (prev := previous_of(releases)) is not None:
        protected.add(prev.version)
    newest = {r.version for r in releases[-keep:]} if keep > 0 else set()
    return [r for r in releases if r.version not in protected and r.version not in newest]


async def remove_release(remote: Remote, layout: Layout, version: str) -> None:
    import asyncssh

    await remote.sftp.rmtree(layout.release(version), ignore_errors=True)
    for path in [layout.record(version)] + [layout.log(version, s) for s in ("engine-build", "validate")]:
        try:
            await remote.sftp.remove(path)
        except asyncssh.SFTPNoSuchFile:
            pass


async def remove_stale_partials(remote: Remote, layout: Layout, keep: str) -> list[str]:
    """Unfinished uploads of *other* bundles: once a ship has completed here they would only fill the disk."""
    gone = []
    for name in await remote.sftp.listdir(layout.releases):
        if name.endswith(".partial") and name != f"{keep}.partial":
            await remote.sftp.rmtree(posixpath.join(layout.releases, name), ignore_errors=True)
            gone.append(name)
    return gone
