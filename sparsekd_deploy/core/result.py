"""What a distillation run returns (and ``build --resume`` reads back), and the progress-event interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputExistsError
from .rundir import read_run_json


class NullReporter:
    """Receives progress events; the CLI's rich reporter draws bars and tables from them."""

    def stage_begin(self, label: str, steps: int) -> None: ...
    def advance(self, loss: float) -> None: ...
    def add_steps(self, steps: int) -> None: ...
    def stage_end(self, record: dict) -> None: ...
    def note(self, message: str) -> None: ...


@dataclass
class Result:
    status: str  # "complete" | "stopped"
    reason: str
    out: Path
    trajectory: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def reached_target(self) -> bool:
        return self.status == "complete"

    @classmethod
    def from_dir(cls, out: Path) -> Result:
        """A finished run, read back from its directory (``build --resume`` reuses it instead of retraining)."""
        summary = read_run_json(out / "summary.json")
        trajectory = read_run_json(out / "trajectory.json").get("stages")
        try:
            return cls(summary["status"], summary["reason"], out, list(trajectory), summary)
        except (KeyError, TypeError):
            raise OutputExistsError(f"run {out} has a damaged summary.json or trajectory.json; pass --overwrite to "
                                    "redo it") from None
