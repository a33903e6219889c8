"""Where things live on a device, under the user's ``--path``:

    <path>/releases/<version>/            a whole, verified bundle (never modified by a later ship)
    <path>/releases/<version>.partial/    an upload in progress (resumable)
    <path>/releases/<version>.ship.json   the release's record: status, steps, when shipped / activated
    <path>/releases/<version>.<step>.log  a remote step's full output
    <path>/current -> releases/<version>  switched atomically (new symlink, then rename over the old one)
    <path>/.ship.lock                     held (flock) by the ship in progress; .ship.lock.json says who
    <path>/.ship.steps.lock               held (flock) by a remote step while it runs

The version is derived from the bundle's content (its manifest's sha256), so the same bundle shipped twice is
recognised as the same release.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from .remote import ShipError

_VERSION = re.compile(r"^v-[0-9a-f]{12}$")


def bundle_version(bundle_dir: Path) -> str:
    from ..digests import sha256_file

    return "v-" + sha256_file(bundle_dir / "manifest.json")[:12]


def check_version(version: str) -> str:
    if not _VERSION.match(version):
        raise ShipError(f"{version!r} is not a release version (they look like v-0123456789ab; "
                        "`sparsekd-deploy releases` lists them)")
    return version


def check_remote_path(path: str) -> str:
    """A device path may hold spaces and shell metacharacters (it is always quoted), but not control characters
    (they would corrupt the line-oriented output of the remote tools) and not be empty."""
    if not path or not path.strip():
        raise ShipError("--path is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ShipError(f"--path {path!r} contains control characters")
    if path.startswith("-"):
        raise ShipError(f"--path {path!r} starts with '-'; write ./{path} if that is really the name")
    if path == "~" or path.startswith("~/"):
        # SFTP and remote commands both start in the login's home: a home-relative path is the relative path.
        path = path[2:] or "."
    elif path.startswith("~"):
        raise ShipError(f"--path {path!r}: only ~/ (the login's own home) is understood; give the full path")
    return path.rstrip("/") or "/"


@dataclass(frozen=True)
class Layout:
    root: str  # absolute on the device (resolved once through SFTP)

    @property
    def releases(self) -> str:
        return posixpath.join(self.root, "releases")

    def release(self, version: str) -> str:
        return posixpath.join(self.releases, check_version(version))

    def partial(self, version: str) -> str:
        return self.release(version) + ".partial"

    def record(self, version: str) -> str:
        return self.release(version) + ".ship.json"

    def log(self, version: str, step: str) -> str:
        return f"{self.release(version)}.{step}.log"

    @property
    def current(self) -> str:
        return posixpath.join(self.root, "current")

    @property
    def lock(self) -> str:
        return posixpath.join(self.root, ".ship.lock")

    @property
    def steps_lock(self) -> str:
        """Held by each remote step: a step of a ship whose connection died can outlive it on the device."""
        return posixpath.join(self.root, ".ship.steps.lock")

    @property
    def lock_info(self) -> str:
        return self.lock + ".json"
