"""The bundle: the unit that ships. A directory with a versioned manifest holding the sha256 of every file.

Writes are atomic (assembled in ``<dir>.partial``, renamed into place). Opening a bundle verifies every
checksum before anything loads, and refuses a schema version this tool does not know.
``validation.json`` is the one mutable file (the *last* validation); it is excluded from the checksums.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import SparseKDError
from .fsutil import swap_into_place, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MUTABLE = ("validation.json", "validation")


class BundleError(SparseKDError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_mutable(rel: str) -> bool:
    return rel == MANIFEST or any(rel == m or rel.startswith(m + "/") for m in MUTABLE)


def file_table(root: Path) -> dict[str, dict]:
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and not _is_mutable(p.relative_to(root).as_posix())
    }


class BundleWriter:
    """Assemble a bundle in ``<out>.partial``; ``commit`` writes the manifest and renames it into place."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.final = Path(out)
        if self.final.exists() and any(self.final.iterdir()) and not overwrite:
            raise BundleError(f"bundle dir {self.final} exists; pass --overwrite to replace it")
        self.dir = self.final.with_name(self.final.name + ".partial")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def commit(self, manifest: dict) -> Path:
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tool": f"sparsekd-deploy {__version__}",
            **manifest,
            "files": file_table(self.dir),
        }
        write_json_atomic(self.dir / MANIFEST, manifest)
        return swap_into_place(self.dir, self.final)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Bundle:
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path} is not a directory; pass a bundle dir made by `sparsekd-deploy build`")
        mf = path / MANIFEST
        if not mf.is_file():
            raise BundleError(f"{path} is not a bundle (no {MANIFEST})")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{mf} is not valid JSON ({e.msg} at line {e.lineno})") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema version {version!r} is not supported by sparsekd-deploy {__version__} "
                f"(supports {SCHEMA_VERSION}); rebuild the bundle or upgrade the tool"
            )
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Every listed file exists with its recorded size and sha256 — before anything loads."""
        problems = []
        for rel, meta in self.manifest.get("files", {}).items():
            p = self.path / rel
            if not p.is_file():
                problems.append(f"{rel} is missing")
            elif p.stat().st_size != meta["bytes"]:
                problems.append(f"{rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?)")
            elif sha256_file(p) != meta["sha256"]:
                problems.append(f"{rel} checksum mismatch (corrupted or modified)")
        if problems:
            raise BundleError(f"bundle {self.path} failed verification: " + "; ".join(problems))

    def file(self, rel: str) -> Path:
        p = self.path / rel
        if rel not in self.manifest.get("files", {}) or not p.exists():
            raise BundleError(f"bundle {self.path} has no {rel}")
        return p

    def has(self, rel: str) -> bool:
        return rel in self.manifest.get("files", {})

    @property
    def model_path(self) -> Path:
        return self.file(self.manifest["model"]["onnx"])

    def add_files(self, files: dict[str, Path], manifest_updates: dict, drop: tuple | list = ()) -> None:
        """Move new files into the bundle and rewrite the manifest with their checksums (atomically).
        Only these files are added: strays a tool left in the directory (a trtexec timing cache, a log) are not
        blessed into the checksum table."""
        table = dict(self.manifest.get("files", {}))
        for rel in drop:  # files this update makes stale: unlisted first, deleted once the manifest says so
            table.pop(rel, None)
        for rel, src in files.items():
            dst = self.path / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            table[rel] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        self.manifest.update(manifest_updates)
        self.manifest["files"] = dict(sorted(table.items()))
        write_json_atomic(self.path / MANIFEST, self.manifest)
        for rel in drop:
            if rel not in files:
                (self.path / rel).unlink(missing_ok=True)

    def write_validation(self, report: dict) -> Path:
        path = self.path / "validation.json"
        write_json_atomic(path, report)
        return path
