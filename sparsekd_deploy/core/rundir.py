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

from ..errors import ConfigError, DataError, OutputExistsError, first_line
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


def _read_safetensors(path: Path, damaged) -> dict[str, torch.Tensor]:
    """``path``'s tensors; a missing, cut or garbage file raises ``damaged(first line of why)`` instead of
    safetensors' traceback."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise damaged(first_line(e, 200)) from None


def damaged_run(run_dir: Path, what: str, why: BaseException | str) -> OutputExistsError:
    """The one error for a run dir that cannot be resumed as it is (a truncated or missing checkpoint, data file or
    state field): it names the file and how to start over, instead of a traceback from safetensors or a KeyError."""
    return OutputExistsError(f"run {run_dir} cannot be resumed: {what} is missing or damaged ({first_line(why, 200)}); "
                             "pass --overwrite to start the run over")


def read_run_data(path: Path) -> dict[str, torch.Tensor]:
    """A run's data.safetensors (token ids: ``train``, ``heldout``), read by build and export after the run; a cut or
    foreign one is one DataError line naming it, not a safetensors traceback."""
    data = _read_safetensors(path, lambda why: DataError(
        f"{path} (the run's token ids) is missing or damaged ({why}); redo the distillation run with --overwrite"))
    missing = [k for k in ("train", "heldout") if k not in data]
    if missing:
        raise DataError(f"{path} (the run's token ids) has no {', '.join(missing)} split; redo the distillation run "
                        "with --overwrite")
    return data


class RunDir:
    def __init__(self, out: str | Path):
        self.final = Path(out)
        self.partial = self.final.with_name(self.final.name + ".partial")

    def prepare(self, resume: bool, overwrite: bool) -> bool:
        """Create the work dir. Returns True when there is state to resume from."""
        if self.final.exists() and not self.final.is_dir():
            # --overwrite replaces a run dir; a file here is a mistyped path (it would be swapped out, not removed)
            raise OutputExistsError(f"{self.final} is a file; name a directory for the run (--overwrite replaces "
                                    "only a run dir)")
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

    def read_resume_state(self) -> dict:
        """state.json of the run to resume, with the fields a resume reads checked (a hand-edited or foreign
        state.json is one line, not a KeyError)."""
        state = self.read_state()
        accepted = state.get("accepted")
        if isinstance(accepted, bool) or not isinstance(accepted, int) or accepted < 0:
            raise damaged_run(self.partial, STATE, f"accepted is {accepted!r}, not a stage number")
        for key, kind in (("trajectory", list), ("teacher_consistency", dict)):
            if not isinstance(state.get(key), kind):
                raise damaged_run(self.partial, STATE, f"{key} is {type(state.get(key)).__name__}, "
                                                       f"not a {kind.__name__}")
        return state

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.partial / (name + ".tmp")
        with writing(tmp):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.partial / name)

    def load_tensors(self, name: str, keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """A tensor file of the run (``keys`` must be in it); a missing or cut one is one error, not a traceback."""
        tensors = _read_safetensors(self.partial / name, lambda why: damaged_run(self.partial, name, why))
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise damaged_run(self.partial, name, f"it has no {', '.join(missing)}")
        return tensors

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

    def load_checkpoint(self, stage: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(weights, masks) of an accepted stage's checkpoint; a missing, truncated or garbage file is one error."""
        ckpt = self.checkpoint_dir(stage)
        what = f"checkpoint {ckpt.relative_to(self.partial)} (accepted stage {stage})"
        weights = [f for f in sorted(ckpt.glob("*.safetensors")) if f.name != "masks.safetensors"]
        if not weights:
            raise damaged_run(self.partial, what, "no weight files in it")

        def damaged(why: str) -> OutputExistsError:
            return damaged_run(self.partial, what, why)

        state = {}
        for f in weights:
            state.update(_read_safetensors(f, damaged))
        masks = {k: v.bool() for k, v in _read_safetensors(ckpt / "masks.safetensors", damaged).items()}
        return state, masks

    def finish(self) -> Path:
        """Swap the finished work dir into place; the previous output is removed only after the swap."""
        return swap_into_place(self.partial, self.final)


def check_resume_config(run: RunDir, config: dict) -> dict:
    """Refuse to resume with settings other than those the interrupted run started with (its ``state.json``);
    a resumed run would otherwise silently mix two configurations. ``out`` may differ in spelling only. Returns the
    settings the resumed run must adopt: those its state.json predates, passed at their default ``auto``
    (``config.STARTED_WITHOUT``)."""
    from ..config import as_started

    if not (run.partial / STATE).is_file():
        return {}  # nothing to resume: RunDir.prepare says so
    saved, adopt = as_started(run.read_state().get("config", {}), config)
    config = {**config, **adopt}
    # qat_target (build's --target) shapes only a QAT stage: without one, a resumed build may change its target.
    ignored = ("out",) if config.get("qat_steps") else ("out", "qat_target")
    differ = [k for k in config if k not in ignored and k in saved and saved[k] != config[k]]
    if differ:
        was = ", ".join(f"{k}={saved[k]}" for k in differ)
        now = ", ".join(f"{k}={config[k]}" for k in differ)
        raise ConfigError([f"run {run.final} was started with {was}, you passed {now}; "
                           "rerun with the same flags or drop --resume"])
    return adopt
