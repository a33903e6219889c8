"""``sparsekd-deploy export STUDENT --format onnx``: the exporter alone."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click

from ..console import err_console, stdout_json
from .error_handling import handle_errors
from .quantize_options import quantize_flags, quantize_options


@click.command("export")
@click.argument("model_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", required=True, help="Output .onnx file.")
@click.option("--pattern", help="The n:m pattern to report the share of (e.g. 2:4); the zeros are checked always.")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's choice).")
@click.option("--fp16", is_flag=True, help="Also write <out>.fp16.onnx.")
@click.option("--no-kv-cache", is_flag=True, help="Export logits only, without past/present key-values.")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]),
              help="The runtime the graphs are made for. onnxruntime: attention fused into ORT's MultiHeadAttention "
                   "(a com.microsoft op other runtimes cannot load) and its quantized copy; tensorrt: Q/DQ copy, no "
                   "contrib ops. [default: standard ONNX, any quantized copy made for onnxruntime]")
@quantize_options
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def export_cmd(model_dir, fmt, out, pattern, opset, fp16, no_kv_cache, target, overwrite, as_json, **flags):
    """Export a student (HF model dir) to ONNX, check parity with PyTorch and audit that every zero survived.

    With --quantize, a static mode calibrates on the training split of the distillation run the student came from
    (STUDENT/../data.safetensors, written by `distill`)."""
    from ..core.patterns import make_pattern
    from ..exporters.onnx import ExportError, check_opset
    from ..exporters.quantize import check_mode
    from ..pipeline.export_step import export_and_audit, fp16_path

    q = quantize_flags(flags)
    out = Path(out)
    quantize_for = target or "onnxruntime"  # a plain export stays standard ONNX; its quantized copy is ORT's
    check_mode(q["quantize"] or "none", quantize_for)
    check_opset(opset)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; name the .onnx file to write")
    # The graphs are written into a work dir beside --out and moved into place only once every check passed: a
    # failed parity check, audit or quantization leaves no .onnx that a later command would take for a good one.
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        res = export_and_audit(Path(model_dir), work / out.name, make_pattern(pattern) if pattern else None,
                               fp16=fp16, opset=opset, with_past=not no_kv_cache,
                               prompts=_parity_prompts(Path(model_dir)),
                               quantize=_quantize_request(Path(model_dir), quantize_for, q), target=target)
        for f in sorted(work.iterdir(), key=lambda f: f.name == out.name):  # --out itself last
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if res.quantization:
        res.quantization["path"] = str(out.parent / Path(res.quantization["path"]).name)
    result = {"export": {**res.info, "path": str(out)}, "parity": res.parity, "pattern_share": res.pattern_share,
              **{f"audit:{name}": report for name, report in res.audits.items()}}
    if fp16:
        result["fp16"] = str(fp16_path(out))
    if res.quantization:
        result["quantization"] = res.quantization
    if as_json:
        stdout_json(result)
        return
    info = res.info
    err_console.print(f"exported with {info['exporter']} (opset {info['opset']}, KV cache {info['with_past']}) → {out}")
    if info.get("fallback"):
        err_console.print(f"no KV cache: {info['fallback']}", markup=False, highlight=False)
    for name, v in res.audits.items():
        share = "" if v["student_pattern_share"] is None else f" ({v['student_pattern_share']:.0%} of groups hold {pattern})"
        err_console.print(f"{name}: {v['holding']}/{v['checked']} pruned weights keep every zero{share}")
    if res.quantization:
        qi = res.quantization
        err_console.print(f"{qi['mode']} → {qi['path']} ({qi['quantizer']}; weights {qi['weights']}; activations "
                          f"{qi['activations']})", markup=False, highlight=False)
        for line in qi["skipped"]:
            err_console.print(f"not quantized: {line}", markup=False, highlight=False)


def _quantize_request(model_dir: Path, target: str, q: dict):
    """The quantization asked for; a static mode's calibration ids come from the run dir around the student."""
    from ..pipeline.export_step import QuantizeRequest

    mode = q["quantize"] or "none"
    if mode == "none":
        return None
    data_file = model_dir.parent / "data.safetensors"
    ids = None
    if data_file.is_file():
        from ..core.rundir import read_run_data

        ids = read_run_data(data_file)["train"].numpy()
    return QuantizeRequest(mode, target, q["calibration"] or "minmax", ids, q["calibration_samples"] or 32,
                           f"the training split of {data_file}" if ids is not None else
                           f"{model_dir} (no distillation run around it: no {data_file.name} beside it)")


def _parity_prompts(model_dir: Path):
    """Seeded random token ids within the vocabulary: parity needs no dataset."""
    import json

    import torch

    try:
        vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # export_onnx names what is wrong with the model dir
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
