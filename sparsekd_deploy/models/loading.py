"""Load teachers and students: local Hugging Face model dirs (safetensors only), the demo teacher, or the
local Hub cache. Nothing is downloaded at run time and nothing is unpickled."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import TeacherNotFoundError

DEMO = "demo"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def demo_teacher_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "demo" / "teacher"


def resolve_teacher(spec: str | None) -> Path:
    """Turn ``--teacher`` into a local model dir, or explain precisely why that is not possible."""
    if spec in (None, "", DEMO):
        path = demo_teacher_dir()
        if not (path / "model.safetensors").is_file():
            raise TeacherNotFoundError(
                f"the demo teacher is missing from {path}; reinstall the package or run scripts/make_demo_teacher.py"
            )
        return path
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherNotFoundError(f"teacher {spec!r} is a file; pass the model directory that holds config.json")
        if not (path / "config.json").is_file():
            raise TeacherNotFoundError(f"teacher dir {spec!r} has no config.json; is it a Hugging Face model dir?")
        if not any(path.glob("*.safetensors")):
            raise TeacherNotFoundError(
                f"teacher dir {spec!r} has no *.safetensors weights; pickled .bin/.pt files are refused for safety "
                "(convert once with `model.save_pretrained(dir, safe_serialization=True)` where you trust the file)"
            )
        return path
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        cached = _from_hub_cache(spec)
        if cached is not None:
            return cached
        raise TeacherNotFoundError(
            f"teacher {spec!r} looks like a Hub id, but this tool never downloads at run time and it is not in the "
            f"local Hub cache; on a connected machine run `huggingface-cli download {spec} --local-dir ./{spec.split('/')[-1]}` "
            "and pass --teacher with that directory"
        )
    raise TeacherNotFoundError(f"teacher path {spec!r} does not exist")


def _from_hub_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    return path if (path / "config.json").is_file() else None


def load_model(path: Path, dtype=None):
    """Load a causal LM from a local dir, safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, local_files_only=True, dtype=dtype or torch.float32
    )
    return model.eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None  # a model dir without a tokenizer still distills (data-free, token ids only)


def max_positions(config) -> int | None:
    """How many positions a model has (the name differs between families)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
