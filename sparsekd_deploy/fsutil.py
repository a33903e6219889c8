"""Atomic file-system steps shared by run dirs and bundles: nothing is ever half-written in place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path.tmp`` and rename it over ``path``; on any failure the tmp file is removed.

    The tmp file is created fresh (O_CREAT|O_EXCL): a leftover ``.tmp`` — or a symlink planted under that name —
    is unlinked first, never written through. The rename replaces ``path`` itself, never what it may link to.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically (``write_bytes_atomic``)."""
    text = json.dumps(obj, indent=2) + "\n"  # serialise first: a TypeError leaves nothing on disk
    write_bytes_atomic(path, text.encode())


def swap_into_place(work: Path, final: Path) -> Path:
    """Rename a finished work dir to ``final``; a previous ``final`` is removed only after the swap."""
    old = None
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
    os.replace(work, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_target(path: Path):
    """Yield a fresh ``path.tmp`` for a writer that needs a file name (a NumPy memmap, a library's save); rename it
    over ``path`` when the block ends, remove it when the block raises. Like :func:`write_bytes_atomic`, a leftover
    ``.tmp`` (or a symlink under that name) is unlinked first, never written through."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
