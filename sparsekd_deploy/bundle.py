"""The bundle: the unit that ships. A directory with a versioned manifest holding the sha256 of every file.

Writes are atomic (assembled in ``<dir>.partial``, renamed into place). Opening a bundle checks the manifest's
shape, verifies every checksum before anything loads, and refuses a schema version this tool does not know.
``validation.json`` is the one mutable file (the *last* validation); it is excluded from the checksums.

A bundle is untrusted input: every path it names (manifest entries, the model, the files written into it) goes
through :func:`confined`, which refuses absolute paths, ``..`` and symlinks that lead out of the bundle.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from . import __version__
from .digests import sha256_file
from .errors import SparseKDError
from .fsutil import swap_into_place, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
VALIDATION = "validation.json"
MUTABLE = (VALIDATION, "validation")
SHA256_HEX = frozenset("0123456789abcdef")


class BundleError(SparseKDError):
    pass


class BundleReadOnlyError(BundleError):
    """The bundle directory cannot be written (read-only mount, no permission): nothing was recorded in it."""


def _is_mutable(rel: str) -> bool:
    return rel == MANIFEST or any(rel == m or rel.startswith(m + "/") for m in MUTABLE)


def _escape(root: Path, rel) -> str | None:
    """Why ``root / rel`` is not a path inside ``root`` (None when it is)."""
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        return f"{rel!r} is not a file name"
    pure, win = PurePosixPath(rel), PureWindowsPath(rel)
    if pure.is_absolute() or win.is_absolute() or win.drive:
        return f"{rel!r} is an absolute path"
    if ".." in pure.parts or ".." in win.parts:
        return f"{rel!r} climbs out of the bundle ('..')"
    real_root, real = root.resolve(), (root / rel).resolve()
    if real == real_root or not real.is_relative_to(real_root):
        return f"{rel!r} leads out of the bundle (a symlink to {real})"
    return None


def confined(root: Path, rel, what: str = "path") -> Path:
    """``root / rel``, refused (BundleError) unless it stays inside ``root`` once symlinks are resolved.

    ``rel`` must be a relative path without ``..``; a symlink inside the bundle that points inside it is allowed,
    one that leads out (to ``/etc/passwd``, to a sibling directory) is refused. The path need not exist.
    """
    root = Path(root)
    problem = _escape(root, rel)
    if problem:
        raise BundleError(f"bundle {root}: {what} {problem}; a bundle may only name files inside it")
    return root / rel


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """The fields every reader relies on, checked once. The full dict stays on ``Bundle.manifest``."""

    schema_version: int
    files: dict[str, FileEntry]
    model: dict
    model_onnx: str

    @classmethod
    def parse(cls, obj, where: str = MANIFEST) -> Manifest:
        """Check the shape; one BundleError listing every problem (never KeyError/TypeError later)."""
        if not isinstance(obj, dict):
            raise BundleError(f"{where} is a JSON {_json_type(obj)}, not an object; it is not a bundle manifest")
        version = obj.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema version {version!r} is not supported by sparsekd-deploy {__version__} "
                f"(supports {SCHEMA_VERSION}); rebuild the bundle or upgrade the tool"
            )
        problems: list[str] = []
        files: dict[str, FileEntry] = {}
        raw_files = obj.get("files")
        if raw_files is None:
            problems.append("no 'files' table")
        elif not isinstance(raw_files, dict):
            problems.append(f"'files' is a JSON {_json_type(raw_files)}, not an object of name → {{sha256, bytes}}")
        else:
            for rel, meta in raw_files.items():
                if not isinstance(meta, dict):
                    problems.append(f"files[{rel!r}] is a JSON {_json_type(meta)}, not {{sha256, bytes}}")
                    continue
                missing = [k for k in ("sha256", "bytes") if k not in meta]
                if missing:
                    problems.append(f"files[{rel!r}] has no {' or '.join(repr(k) for k in missing)}")
                    continue
                digest, size = meta["sha256"], meta["bytes"]
                if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= SHA256_HEX):
                    problems.append(f"files[{rel!r}].sha256 is not a sha256 hex digest")
                elif isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    problems.append(f"files[{rel!r}].bytes is {size!r}, not a byte count")
                else:
                    files[rel] = FileEntry(digest, size)
        model = obj.get("model")
        onnx = None
        if model is None:
            problems.append("no 'model' section")
        elif not isinstance(model, dict):
            problems.append(f"'model' is a JSON {_json_type(model)}, not an object")
        elif not isinstance(model.get("onnx"), str):
            problems.append("'model' has no 'onnx' file name")
        else:
            onnx = model["onnx"]
        if problems:
            raise BundleError(f"{where} is malformed: " + "; ".join(problems) + "; rebuild the bundle")
        return cls(version, files, model, onnx)


def _json_type(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def read_json_object(path: Path, what: str, fix: str) -> dict | None:
    """A JSON object file, or None when absent; a damaged one is one BundleError saying what it is and how to
    ``fix`` it."""
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{path} is a JSON {_json_type(obj)}, not a {what}; {fix}")
    return obj


def _read_only(e: OSError) -> bool:
    return isinstance(e, PermissionError) or e.errno == errno.EROFS


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
    manifest: dict  # the manifest as written (every section); its required shape is checked by ``Manifest.parse``
    # ``unlisted()`` as ``verify`` found it: ``unlisted_note`` (inspect, validate) reuses it instead of walking the
    # bundle a second time; ``add_files`` (which changes what is listed) drops it.
    _verified_unlisted: dict[str, str | None] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Bundle:
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path} is not a directory; pass a bundle dir made by `sparsekd-deploy build`")
        mf = path / MANIFEST
        if not mf.is_file():
            raise BundleError(f"{path} is not a bundle (no {MANIFEST})")
        confined(path, MANIFEST, "manifest")
        try:
            manifest = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            why = e.msg if isinstance(e, json.JSONDecodeError) else e.reason
            raise BundleError(f"{mf} is not valid JSON ({why}{where})") from None
        Manifest.parse(manifest, str(mf))
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    @property
    def meta(self) -> Manifest:
        """The manifest's required fields, typed."""
        return Manifest.parse(self.manifest, str(self.path / MANIFEST))

    def verify(self) -> None:
        """Every listed file lies inside the bundle and has its recorded size and sha256 — before anything loads."""
        from .precisions import PRECISIONS, manifest_key

        problems = []
        meta_ = self.meta
        # A graph the manifest names must be one of its listed (checksummed, confined) files: a name outside the
        # table would pass verification here and be refused, or loaded unchecked, only when used.
        for key in (manifest_key(p) for p in PRECISIONS):
            rel = meta_.model.get(key)
            if rel is not None and rel not in meta_.files:
                problem = _escape(self.path, rel)
                problems.append(f"model.{key} names {rel!r}, which the files table does not list"
                                + (f" ({problem})" if problem else ""))
        for rel, meta in meta_.files.items():
            p = self.path / rel
            if problem := _escape(self.path, rel):
                problems.append(problem + " (a bundle may only name files inside it)")
            elif not p.is_file():
                problems.append(f"{rel} is missing")
            elif p.stat().st_size != meta.bytes:
                problems.append(f"{rel} has {p.stat().st_size} bytes, manifest says {meta.bytes} (truncated?)")
            elif sha256_file(p) != meta.sha256:
                problems.append(f"{rel} checksum mismatch (corrupted or modified)")
        found = self.unlisted()
        for rel, link in found.items():
            if link is not None and (problem := _escape(self.path, rel)):
                problems.append(f"unlisted {problem}: remove it")
        if problems:
            raise BundleError(f"bundle {self.path} failed verification: " + "; ".join(problems))
        self._verified_unlisted = found

    def unlisted(self) -> dict[str, str | None]:
        """What the bundle holds beyond its files table and the mutable validation records: rel → the symlink's
        target as written (None for a regular file). Unlisted regular files are strays a tool may leave
        (a trtexec timing cache, a log): tolerated, never checksummed, never blessed into the table (``add_files``),
        and shown by ``inspect`` / ``validate``. Found without following a symlink: a link is reported as itself
        (``verify`` refuses one that leads out of the bundle) and a linked directory is not entered, so nothing
        outside the bundle is ever listed or read."""
        listed = set(self.meta.files)
        found: dict[str, str | None] = {}
        for top, dirs, names in os.walk(self.path, followlinks=False):
            here = Path(top).relative_to(self.path)
            for name in sorted(dirs + names):
                p = Path(top) / name
                rel = (here / name).as_posix()
                # (a leftover `validation.json.tmp` is the atomic writer's: unlinked before it writes, never followed)
                if rel in listed or _is_mutable(rel) or rel in (f"{MANIFEST}.tmp", f"{VALIDATION}.tmp"):
                    continue
                if p.is_symlink():
                    found[rel] = os.readlink(p)
                elif p.is_file():
                    found[rel] = None
            dirs[:] = [d for d in dirs if not _is_mutable((here / d).as_posix()) and not (Path(top) / d).is_symlink()]
        return dict(sorted(found.items()))

    def unlisted_note(self) -> str | None:
        """One line naming what ``unlisted`` found (None when nothing), for ``inspect`` and ``validate``: what
        ``verify`` found when it ran (one walk of the bundle per command), else a walk now."""
        found = self._verified_unlisted if self._verified_unlisted is not None else self.unlisted()
        if not found:
            return None
        names = [rel + (f" (symlink to {link})" if link is not None else "") for rel, link in found.items()]
        shown = ", ".join(names[:5]) + (f", … ({len(names) - 5} more)" if len(names) > 5 else "")
        return (f"{len(found)} file(s) in the bundle that its manifest does not list (no checksum covers them; "
                f"tolerated as strays): {shown}")

    def file(self, rel: str) -> Path:
        """A listed file of the bundle, confined to it (an absolute, ``..`` or escaping path is refused)."""
        p = confined(self.path, rel, "file")
        if rel not in self.manifest.get("files", {}) or not p.exists():
            raise BundleError(f"bundle {self.path} has no {rel}")
        return p

    def has(self, rel: str) -> bool:
        return rel in self.manifest.get("files", {})

    @property
    def model_path(self) -> Path:
        return self.file(self.meta.model_onnx)

    def writable_dir(self, rel: str) -> Path:
        """A directory inside the bundle to write into (created if absent): refused when ``rel`` or an entry in it
        is a symlink leading out of the bundle, so nothing written there lands elsewhere."""
        d = confined(self.path, rel, "directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise BundleError(f"bundle {self.path}: {rel} exists and is not a directory") from None
        except OSError as e:
            if _read_only(e):
                raise BundleReadOnlyError(f"bundle {self.path} is not writable ({e.strerror}): cannot create {rel}/"
                                          ) from None
            raise
        confined(self.path, rel, "directory")  # created through a link planted meanwhile?
        for entry in os.scandir(d):
            if entry.is_symlink():
                confined(self.path, f"{rel}/{entry.name}", "file")
        return d

    def add_files(self, files: dict[str, Path], manifest_updates: dict, drop: tuple | list = ()) -> None:
        """Move new files into the bundle and rewrite the manifest with their checksums (atomically).
        Only these files are added: strays a tool left in the directory (a trtexec timing cache, a log) are not
        blessed into the checksum table."""
        self._verified_unlisted = None  # what is listed changes: a later note walks again
        dests = {rel: confined(self.path, rel, "file") for rel in files}
        gone = {rel: confined(self.path, rel, "file") for rel in drop}
        table = dict(self.manifest.get("files", {}))
        for rel in drop:  # files this update makes stale: unlisted first, deleted once the manifest says so
            table.pop(rel, None)
        for rel, src in files.items():
            dst = dests[rel]
            dst.parent.mkdir(parents=True, exist_ok=True)
            confined(self.path, rel, "file")  # the parent it now has stays inside
            os.replace(src, dst)
            table[rel] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        self.manifest.update(manifest_updates)
        self.manifest["files"] = dict(sorted(table.items()))
        write_json_atomic(self.path / MANIFEST, self.manifest)
        for rel, p in gone.items():
            if rel not in files:
                p.unlink(missing_ok=True)

    def read_validation(self) -> dict | None:
        """The last validation report, or None when the bundle was never validated."""
        return self.read_json(VALIDATION, "validation report", "delete it and rerun `sparsekd-deploy validate`")

    def read_json(self, rel: str, what: str, fix: str) -> dict | None:
        """A JSON object file of the bundle (confined to it), or None when absent; a damaged one is one BundleError
        saying what it is and how to ``fix`` it."""
        return read_json_object(confined(self.path, rel, what), what, fix)

    def write_validation(self, report: dict) -> Path:
        """Record the last validation; ``BundleReadOnlyError`` (nothing left behind) where the bundle is read-only."""
        path = confined(self.path, VALIDATION, "validation report")
        try:
            write_json_atomic(path, report)
        except OSError as e:
            if _read_only(e):
                raise BundleReadOnlyError(
                    f"bundle {self.path} is not writable ({e.strerror}): the verdict was not recorded in {VALIDATION}"
                ) from None
            raise
        return path
