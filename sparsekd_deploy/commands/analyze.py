"""``sparsekd-deploy analyze``: load-path analysis of a teacher (which layers carry the load) before pruning."""

from __future__ import annotations

from pathlib import Path

import click

from ..console import err_console, stdout_json
from .error_handling import handle_errors


@click.command("analyze")
@click.option("--teacher", help="Local HF model dir (safetensors) or cached Hub id; default: the demo teacher.")
@click.option("--pattern", default="2:4", show_default=True, help="2:4 (any n:m), unstructured:S or channels:S.")
@click.option("--data", help="Text file or dir of *.txt; default: data-free (sample the teacher, seeded).")
@click.option("--tokenizer", help="Dir of the teacher's tokenizer when the teacher dir has none (needed with --data).")
@click.option("--importance", type=click.Choice(["wanda", "magnitude"]), default="wanda", show_default=True)
@click.option("--include", multiple=True, help="Glob of layers to analyse (repeatable). [default: *]")
@click.option("--exclude", multiple=True, help="Glob of layers to leave out (repeatable); default: embeddings, lm_head.")
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--heldout-samples", type=int, default=32, show_default=True, help="Sequences the KL is measured on.")
@click.option("--calib-samples", type=int, default=32, show_default=True, help="Sequences the importance is scored on.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", help="Output dir for loadpaths.json + loadpaths.png. [default: analysis/<teacher name>]")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (progress stays on stderr).")
@handle_errors
def analyze_cmd(teacher, pattern, data, tokenizer, importance, include, exclude, seq_len, heldout_samples,
                calib_samples, batch_size, seed, out, as_json):
    """Measure, for every prunable layer, the held-out KL(teacher‖teacher with only that layer pruned to the
    pattern) and its importance statistics; write loadpaths.json and a heat map (block × module kind).

    The file feeds load-path allocation (unstructured/channels) or dense layers (n:m) in distill.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..core.loadpaths import analyze_to
    from ..models.adapters import DEFAULT_EXCLUDE

    if out is None:
        name = Path(teacher).expanduser().resolve().name if teacher not in (None, "", "demo") else "demo"
        out = str(Path("analysis") / (name or "teacher"))
    bar = Progress(TextColumn("analyze [bold]{task.description}[/bold]"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err_console, transient=True, disable=not err_console.is_terminal)
    task = bar.add_task("", total=None)

    def progress(done, total, name):
        bar.update(task, completed=done, total=total, description=name)

    with bar:
        report, paths = analyze_to(out, teacher, pattern, data=data, tokenizer_dir=tokenizer, importance=importance,
                                   include=tuple(include) or ("*",), exclude=tuple(exclude) or DEFAULT_EXCLUDE,
                                   seq_len=seq_len, calib_samples=calib_samples, heldout_samples=heldout_samples,
                                   batch_size=batch_size, seed=seed, progress=progress)
    if as_json:
        stdout_json({**report.to_dict(), "files": {k: str(v) for k, v in paths.items()}})
        return
    from rich.table import Table

    med = report.median_kl()
    table = Table(title=f"load paths at {report.pattern} (top 10 of {len(report.layers)}; median KL {med:.4g})",
                  box=None, pad_edge=False)
    for col in ("#", "layer", "KL alone", "× median", "top-1", "outliers", "params"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    for i, ly in enumerate(report.ranked()[:10], 1):
        table.add_row(str(i), ly.name, f"{ly.kl:.4g}", f"{ly.kl / med:.1f}" if med > 0 else "—", f"{ly.top1:.3f}",
                      f"{ly.outlier_ratio:.2%}", f"{ly.params:,}")
    err_console.print(table)
    err_console.print(f"{len(report.layers)} units in {report.seconds:.1f}s → {paths['json']}, {paths['png']}",
                      soft_wrap=True)
