"""``sparsekd-deploy build``: the main job — distill, export, bundle, validate on the target runtime."""

from __future__ import annotations

import sys

import click

from ..cli import handle_errors
from ..console import RichReporter, print_error, stdout_json
from .distill import config_from_flags, distill_options
from .gates import gate_options, gates_from


@click.command("build")
@click.option("--target", type=click.Choice(["onnxruntime"]), default="onnxruntime", show_default=True,
              help="Runtime the bundle is built and validated for.")
@click.option("--out", required=True, help="Bundle dir to write.")
@click.option("--run-dir", help="Where the distillation run goes. [default: runs/<bundle name>]")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider for validation.")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's choice).")
@click.option("--fp16", is_flag=True, help="Also write an FP16 copy of the graph (model.fp16.onnx).")
@gate_options
@distill_options
@handle_errors
def build_cmd(target, out, run_dir, provider, opset, fp16, recipe, resume, overwrite, as_json, **flags):
    """Distill → export ONNX → audit → bundle → validate. Accepts every `distill` flag.

    Exit code: 0 validation passed (and target sparsity reached), 1 failed, 2 bad input.
    """
    from ..pipeline import BuildOptions, build
    from ..validate.report import print_table

    gates = gates_from(flags)
    cfg = config_from_flags(recipe, "placeholder", flags)
    reporter = RichReporter()
    res = build(cfg, out, BuildOptions(target=target, provider=provider, opset=opset, fp16=fp16, run_dir=run_dir,
                                       overwrite=overwrite, resume=resume), reporter, gates)
    report = res["validation"]
    if as_json:
        stdout_json(res)
    elif report is not None:
        print_table(report, reporter.console)
    ok = res["distillation"]["reached_target"] and (report is None or report["passed"])
    if not res["distillation"]["reached_target"]:
        print_error(f"target sparsity not reached: {res['distillation']['reason']}")
    sys.exit(0 if ok else 1)
