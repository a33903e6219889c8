"""Terminal output: a live progress bar and a per-stage table (rich), or silence under --json."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

err_console = Console(stderr=True)


def is_main_process() -> bool:
    """False in the other ranks of a run started by torchrun / accelerate launch (they set RANK): a distributed run
    prints its progress, notes, verdicts and errors once, from rank 0."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def fmt(x, spec=".4f") -> str:
    return "—" if x is None else format(x, spec)


class RichReporter:
    """Progress on stderr so stdout stays clean for --json."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet or not is_main_process()
        self.console = Console(stderr=True, quiet=self.quiet)
        self.progress: Progress | None = None
        self.task = None

    def note(self, message: str) -> None:
        # soft_wrap: long command lines in notes must survive copy-paste (no hard line breaks inserted).
        self.console.print(f"[dim]•[/dim] {message}", soft_wrap=True)

    def stage_begin(self, label: str, steps: int) -> None:
        self.progress = Progress(
            TextColumn("stage [bold]{task.description}[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=True, disable=self.quiet or not self.console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task(label, total=steps, loss="—")

    def add_steps(self, steps: int) -> None:
        task = self.progress.tasks[0]
        self.progress.update(self.task, total=task.total + steps)

    def advance(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")

    def stage_end(self, record: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
        table = Table(show_header=record["stage"] == 1, box=None, pad_edge=False)
        for col, width in (("stage", 10), ("sparsity", 9), ("KL pruned", 10), ("KL", 9), ("top-1", 7),
                           ("steps", 6), ("verdict", 10), ("entropy s/t", 12)):
            table.add_column(col, width=width, justify="right" if col != "stage" else "left")
        ent = ""
        if "consistency" in record:
            t = next(iter(record["consistency"]["student"]))
            ent = (f"{record['consistency']['student'][t]['mean_entropy']:.2f}/"
                   f"{record['consistency']['teacher'][t]['mean_entropy']:.2f}")
        verdict = "[green]accepted[/green]" if record["accepted"] else "[red]rejected[/red]"
        table.add_row(record["label"], f"{record['sparsity']:.1%}", fmt(record["kl_after_prune"]), fmt(record["kl"]),
                      fmt(record["top1"], ".3f"), str(record["steps"]), verdict, ent)
        self.console.print(table)


def print_error(message: str) -> None:
    # One line, no traceback: these are user mistakes or verdicts, not bugs. The message is text, not markup
    # (a hint such as `pip install 'sparsekd-deploy[full]'` must keep its brackets).
    from rich.markup import escape

    if not is_main_process():
        return
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


# The real stdout while a --json command runs (``json_stdout``); None otherwise.
_json_out = None


@contextlib.contextmanager
def json_stdout():
    """Keep stdout for the one JSON document of a --json command: while the command runs, whatever else is printed
    there goes to stderr — libraries print() their chatter (ORT's fusers print "failed in shape inference" for a
    Cohere graph), and a single stray line would break the document. ``stdout_json`` writes to the real stdout."""
    global _json_out
    previous, _json_out = _json_out, _json_out or sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_out = previous


def stdout_json(obj) -> None:
    import json

    if not is_main_process():
        return
    out = _json_out or sys.stdout
    out.write(json.dumps(obj, indent=2) + "\n")
    out.flush()
