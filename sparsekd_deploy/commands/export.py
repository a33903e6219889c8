"""``sparsekd-deploy export STUDENT --format onnx``: the exporter alone."""

from __future__ import annotations

from pathlib import Path

import click

from ..console import err_console, stdout_json
from .error_handling import handle_errors


@click.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", required=True, help="Output .onnx file.")
@click.option("--pattern", help="The n:m pattern to report the share of (e.g. 2:4); the zeros are checked always.")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's choice).")
@click.option("--fp16", is_flag=True, help="Also write <out>.fp16.onnx.")
@click.option("--no-kv-cache", is_flag=True, help="Export logits only, without past/present key-values.")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def export_cmd(model_dir, fmt, out, pattern, opset, fp16, no_kv_cache, overwrite, as_json):
    """Export a student (HF model dir) to ONNX, check parity with PyTorch and audit that every zero survived."""
    from ..core.patterns import make_pattern
    from ..exporters.onnx import ExportError
    from ..pipeline.export_step import export_and_audit, fp16_path

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; name the .onnx file to write")
    res = export_and_audit(Path(model_dir), out, make_pattern(pattern) if pattern else None, fp16=fp16, opset=opset,
                           with_past=not no_kv_cache, prompts=_parity_prompts(Path(model_dir)))
    result = {"export": {**res.info, "path": str(out)}, "parity": res.parity, "pattern_share": res.pattern_share,
              **{f"audit:{name}": report for name, report in res.audits.items()}}
    if fp16:
        result["fp16"] = str(fp16_path(out))
    if as_json:
        stdout_json(result)
        return
    info = res.info
    err_console.print(f"exported with {info['exporter']} (opset {info['opset']}, KV cache {info['with_past']}) → {out}")
    for name, v in res.audits.items():
        share = "" if v["student_pattern_share"] is None else f" ({v['student_pattern_share']:.0%} of groups hold {pattern})"
        err_console.print(f"{name}: {v['holding']}/{v['checked']} pruned weights keep every zero{share}")


def _parity_prompts(model_dir: Path):
    """Seeded random token ids within the vocabulary: parity needs no dataset."""
    import json

    import torch

    try:
        vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # export_onnx names what is wrong with the model dir
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
