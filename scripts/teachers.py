"""Teachers for the benchmarks, built by the project itself (no download).

The demo teacher (``sparsekd_deploy/demo/teacher``, a narrow-and-deeper Llama, vocab 4096) is committed. The second
one, of another shape (a wide-and-shallow GPT-2 with Conv1D layers, learned positions and its own BPE of vocab
2048; ``SHAPES["wide"]`` in ``make_demo_teacher.py``), is trained on the same corpus and held-out split the same way
on first use and cached as a normal Hugging Face dir (safetensors, tokenizer files, ``training.json``):

    import sys; sys.path.insert(0, "scripts")      # or run the benchmark as scripts/<name>.py
    from teachers import demo_teacher, second_teacher
    wide = second_teacher()                          # runs/teachers/wide; ~6 min of CPU the first time

It loads with ``sparsekd_deploy.models.loading.load_model(wide)`` and ``load_tokenizer(wide)``, or
``sparsekd-deploy distill --teacher runs/teachers/wide ...``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_demo_teacher.py"
WIDE_MINUTES = 6.0
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json")


def demo_teacher() -> Path:
    """The committed demo teacher's dir."""
    return ROOT / "sparsekd_deploy" / "demo" / "teacher"


def is_complete(path: Path, shape: str) -> bool:
    """Whether ``path`` holds a finished teacher of ``shape`` (``training.json`` is the last file written)."""
    if not all((path / f).is_file() for f in REQUIRED):
        return False
    try:
        return json.loads((path / "training.json").read_text()).get("shape") == shape
    except (OSError, ValueError):
        return False


def train_teacher(shape: str, out: Path, minutes: float, seed: int = 0, corpus_mb: float | None = None,
                  threads: int | None = 1) -> Path:
    """Train ``shape`` into ``out`` with ``make_demo_teacher.py`` in a child interpreter (argument list, no shell).

    A child process keeps the caller's torch RNG, threads and memory untouched. It writes to a temporary sibling
    dir that is renamed into place only when complete, so a stopped run never leaves a half teacher at ``out``.
    ``threads=1`` by default: on the shared 2-core machine, under load, one torch thread ran a training step ~3x
    faster than two (0.78 s vs 2.2 s at batch 16 x 128), so a time-budgeted run gets ~3x the steps.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, str(SCRIPT), "--shape", shape, "--out", str(tmp), "--minutes", str(minutes),
           "--seed", str(seed)] + ([] if corpus_mb is None else ["--corpus-mb", str(corpus_mb)]) \
        + ([] if threads is None else ["--threads", str(threads)])
    print(f"training the {shape!r} teacher into {out} (~{minutes:g} min): {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        subprocess.run(cmd, check=True, cwd=ROOT)
        if not is_complete(tmp, shape):
            raise RuntimeError(f"{SCRIPT.name} --shape {shape} finished but {tmp} is incomplete")
        try:
            tmp.rename(out)
        except OSError:
            if not is_complete(out, shape):  # not a concurrent run that finished first: a stale dir is in the way
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def second_teacher(cache_root: Path = ROOT / "runs" / "teachers", minutes: float = WIDE_MINUTES) -> Path:
    """The wide GPT-2-shaped teacher's HF dir (``cache_root/wide``), trained first if it is not there yet.

    ``cache_root`` defaults to the repo's ``runs/teachers`` (git-ignored) whatever the working directory; a
    relative ``cache_root`` is taken relative to the working directory. ``minutes`` only matters when training.
    """
    out = Path(cache_root) / "wide"
    if not is_complete(out, "wide"):
        if out.exists():
            raise RuntimeError(f"{out} exists but is not a complete 'wide' teacher (no training.json with "
                               f"shape 'wide'); remove it to have it trained again")
        train_teacher("wide", out, minutes)
    return out


if __name__ == "__main__":
    print(second_teacher())
