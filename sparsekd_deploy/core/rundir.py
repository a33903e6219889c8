"""The run directory: work happens in ``<out>.partial`` and is renamed into place only when the run ends,
so a failed or killed run never leaves a half-written ``<out>`` and never destroys a previous one.
``--resume`` continues from the partial dir's last accepted checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, OutputExistsError
from ..fsutil import swap_into_place, write_json_atomic

STATE = "state.json"


def read_run_json(path: Path) -> dict:
    """A JSON object the run wrote (state, summary, trajectory); a damaged one is one error saying how to start over."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OutputExistsError(f"{path} is missing or damaged ({e}); pass --overwrite to start the run over") from None
    if not isinstance(obj, dict):
        raise OutputExistsError(f"{path} is not a JSON object; pass --overwrite to start the run over")
    return obj


def read_run_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file the run wrote (data, checkpoint weights, masks); a damaged one is one error saying how to
    start over, not safetensors' traceback."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise OutputExistsError(f"{path} is missing or damaged ({e}); pass --overwrite to start the run over") from None


@contextlib.contextmanager
def writing(path: Path):
    """safetensors reports a failed write (a full disk, a read-only mount) as SafetensorError with the OS error in its
    text; turn it back into the OSError it is, so the CLI answers it as one line like any other I/O failure."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        code = re.search(r"os error (\d+)|code: (\d+)", str(e))  # "... I/O error: No space left (os error 28)"
        if code is None:
            raise
        n = int(code.group(1) or code.group(2))
        raise OSError(n, os.strerror(n), str(path)) from None


class RunDir:
    def __init__(self, out: str | Path):
        self.final = Path(out)
        self.partial = self.final.with_name(self.final.name + ".partial")

    def prepare(self, resume: bool, overwrite: bool) -> bool:
        """Create the work dir. Returns True when there is state to resume from."""
        final_used = self.final.exists() and any(self.final.iterdir()) if self.final.is_dir() else self.final.exists()
        if resume:
            if (self.partial / STATE).is_file():
                return True
            if final_used:
                raise OutputExistsError(f"{self.final} holds a finished run; nothing to resume (use --overwrite to redo it)")
            raise OutputExistsError(f"nothing to resume: no interrupted run at {self.partial}")
        if final_used and not overwrite:
            raise OutputExistsError(f"output dir {self.final} exists; pass --overwrite to replace it or choose another --out")
        if self.partial.exists():
            if not overwrite:
                raise OutputExistsError(
                    f"an interrupted run is in {self.partial}; pass --resume to continue it or --overwrite to start over"
                )
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        return False

    # -- state and checkpoints -------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> Path:
        write_json_atomic(self.partial / name, obj)
        return self.partial / name

    def read_state(self) -> dict:
        return read_run_json(self.partial / STATE)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.partial / (name + ".tmp")
        with writing(tmp):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.partial / name)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return read_run_tensors(self.partial / name)

    def checkpoint_dir(self, stage: int) -> Path:
        return self.partial / "checkpoints" / f"stage-{stage}"

    def save_checkpoint(self, stage: int, model, masks: dict[str, torch.Tensor]) -> Path:
        final = self.checkpoint_dir(stage)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp):
            model.save_pretrained(tmp, safe_serialization=True)
            save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(tmp / "masks.safetensors"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def load_masks(self, stage: int) -> dict[str, torch.Tensor]:
        return {k: v.bool() for k, v in read_run_tensors(self.checkpoint_dir(stage) / "masks.safetensors").items()}

    def finish(self) -> Path:
        """Swap the finished work dir into place; the previous output is removed only after the swap."""
        return swap_into_place(self.partial, self.final)


def check_resume_config(run: RunDir, config: dict) -> None:
    """Refuse to resume with settings other than those the interrupted run started with (its ``state.json``);
    a resumed run would otherwise silently mix two configurations. ``out`` may differ in spelling only."""
    if not (run.partial / STATE).is_file():
        return  # nothing to resume: RunDir.prepare says so
    saved = run.read_state().get("config", {})
    differ = [k for k in config if k != "out" and k in saved and saved[k] != config[k]]
    if differ:
        was = ", ".join(f"{k}={saved[k]}" for k in differ)
        now = ", ".join(f"{k}={config[k]}" for k in differ)
        raise ConfigError([f"run {run.final} was started with {was}, you passed {now}; "
                           "rerun with the same flags or drop --resume"])
