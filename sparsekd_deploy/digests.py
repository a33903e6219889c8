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


# The files a Hugging Face tokenizer is loaded from (those present are hashed; model weights and configs are not).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model")


def tokenizer_digest(tokenizer_dir: str | Path | None) -> str:
    """One digest over a tokenizer dir's tokenizer files (name and content, sorted by name); "none" without any."""
    files = [] if tokenizer_dir is None else sorted(Path(tokenizer_dir) / n for n in TOKENIZER_FILES
                                                    if (Path(tokenizer_dir) / n).is_file())
    if not files:
        return "none"
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        _feed(h, f)
    return h.hexdigest()
