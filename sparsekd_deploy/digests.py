"""Content hashes, streamed: weights files can be many GB and must never be read into memory whole."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def _feed(h, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    _feed(h, path)
    return h.hexdigest()


def weights_digest(model_dir: str | Path) -> str:
    """One digest over a model dir's safetensors files (sorted by name), as recorded in a bundle's manifest."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        _feed(h, f)
    return h.hexdigest()
