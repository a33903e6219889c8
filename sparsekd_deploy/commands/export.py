"""``sparsekd-deploy export STUDENT --format onnx``: the exporter alone."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..cli import handle_errors
from ..console import err_console, stdout_json


@click.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", required=True, help="Output .onnx file.")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's choice).")
@click.option("--fp16", is_flag=True, help="Also write <out>.fp16.onnx.")
@click.option("--no-kv-cache", is_flag=True, help="Export logits only, without past/present key-values.")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def export_cmd(model_dir, fmt, out, opset, fp16, no_kv_cache, overwrite, as_json):
    """Export a student (HF model dir) to ONNX and audit its sparsity pattern."""
    from ..core.patterns import NM, make_pattern
    from ..exporters.audit import audit_onnx, audit_report, pruned_weights, require_pattern
    from ..exporters.fp16 import convert_fp16
    from ..exporters.onnx import ExportError, export_onnx

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    info = export_onnx(model_dir, out, opset=opset, with_past=not no_kv_cache).to_dict()
    result = {"export": info}
    paths = [out]
    if fp16:
        paths.append(convert_fp16(out, out.with_name(out.stem + ".fp16.onnx")))
        result["fp16"] = str(paths[-1])
    sp_file = Path(model_dir).parent / "sparsity.json"
    if sp_file.is_file():
        sparsity = json.loads(sp_file.read_text())
        pattern = make_pattern(sparsity["pattern"])
        if isinstance(pattern, NM) and sparsity["layers"]:
            weights = pruned_weights(model_dir, sparsity)
            for p in paths:
                res = audit_onnx(p, weights, pattern.n, pattern.m)
                result[f"audit:{p.name}"] = audit_report(res)
                require_pattern(res, p.name)
    if as_json:
        stdout_json(result)
    else:
        err_console.print(f"exported with {info['exporter']} (opset {info['opset']}, KV cache {info['with_past']}) → {out}")
        for k, v in result.items():
            if k.startswith("audit:"):
                err_console.print(f"{k[6:]}: {v['holding']}/{v['checked']} pruned initializers keep the pattern")
