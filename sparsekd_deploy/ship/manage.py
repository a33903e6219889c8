"""``releases`` and ``rollback``: read and switch what a device runs."""

from __future__ import annotations

from dataclasses import dataclass

from .lock import DeviceLock
from .releases import Release, activate, list_releases, rollback_target
from .remote import HostSpec, Remote, ShipError, read_json
from .ship import ReleaseRefused, open_layout
from .upload import ShipFile, verify_on_device


async def device_releases(spec: HostSpec, path: str) -> tuple[str, list[Release]]:
    remote = await Remote.open(spec)
    try:
        layout = await open_layout(remote, path, create=False)
        return layout.root, await list_releases(remote, layout)
    finally:
        await remote.close()


@dataclass
class RollbackResult:
    host: str
    path: str
    from_version: str | None
    to_version: str

    def to_dict(self) -> dict:
        return {"host": self.host, "path": self.path, "from": self.from_version, "to": self.to_version}


async def rollback(spec: HostSpec, path: str, to: str | None = None) -> RollbackResult:
    """Point ``current`` back at ``to`` (default: the release active before the current one), after checking every
    file of that release against its own manifest on the device."""
    remote = await Remote.open(spec)
    try:
        layout = await open_layout(remote, path, create=False)
        async with DeviceLock(remote, layout):
            releases = await list_releases(remote, layout)
            target = rollback_target(releases, to)
            cur = next((r.version for r in releases if r.current), None)
            if target.version == cur:
                raise ShipError(f"{target.version} is already current on {spec.label}:{layout.root}")
            manifest = await read_json(remote, layout.release(target.version) + "/manifest.json")
            if manifest is None or not isinstance(manifest.get("files"), dict):
                raise ReleaseRefused(f"release {target.version} on the device has no readable manifest.json; "
                                     "not activated")
            files = [ShipFile(rel, int(m["bytes"]), m["sha256"]) for rel, m in manifest["files"].items()]
            if bad := await verify_on_device(remote, layout.release(target.version), files):
                raise ReleaseRefused(f"release {target.version} no longer matches its checksums on the device "
                                     f"({', '.join(bad)}); `current` is unchanged")
            await activate(remote, layout, target.version)
            return RollbackResult(spec.label, layout.root, cur, target.version)
    finally:
        await remote.close()
