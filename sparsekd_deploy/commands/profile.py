"""``sparsekd-deploy profile``: per-layer dense vs 2:4 timing on this GPU at the deployed shapes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..console import err_console, stdout_json
from .error_handling import handle_errors


@click.command("profile")
@click.option("--target", type=click.Choice(["torch", "tensorrt"]), default="torch", show_default=True)
@click.option("--model", "model_dir", required=True, type=click.Path(), help="HF model dir (teacher or student).")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--seq", type=int, default=4096, show_default=True, help="Tokens per sequence (prefill).")
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--out", default="profile.json", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def profile_cmd(target, model_dir, batch, seq, dtype, out, as_json):
    """Time every eligible layer dense vs 2:4 and predict the end-to-end gain; feed the result to
    `distill --sparsify-only-faster profile.json` to keep dense the layers where 2:4 does not pay."""
    from ..errors import ConfigError
    from ..speedup import profile

    problems = [f"--batch and --seq must be ≥ 1, got {batch} and {seq}"] if batch < 1 or seq < 1 else []
    if not model_dir.strip():  # Path('') is the current directory: an unset shell variable would profile that
        problems.append(f"--model is empty ({model_dir!r}): pass the model dir (teacher or student) to profile")
    if problems:
        raise ConfigError(problems)
    result = profile(Path(model_dir), target, batch, seq, dtype)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        stdout_json(result)
        return
    e = result["end_to_end"]
    err_console.print(f"{result['device']}: {e['layers_sparse']}/{e['layers_total']} layers faster with 2:4; predicted "
                      f"end-to-end {e['predicted_speedup']:.2f}x at {result['tokens']} tokens → {out}")
