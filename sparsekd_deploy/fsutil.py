"""Atomic file-system steps shared by run dirs and bundles: nothing is ever half-written in place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
