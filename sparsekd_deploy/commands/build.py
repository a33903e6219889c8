"""``sparsekd-deploy build``: the main job — distill, export, bundle, validate on the target runtime."""

from __future__ import annotations

import sys

import click

from ..console import RichReporter, print_error, stdout_json
from .distill import config_from_flags, distill_options
from .error_handling import handle_errors
from .gates import gate_options, gates_from
from .quantize_options import quantize_flags, quantize_options


@click.command("build")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt", "torch"]), default="onnxruntime",
              show_default=True, help="Runtime the bundle is built and validated for.")
@click.option("--out", required=True, help="Bundle dir to write.")
@click.option("--run-dir", help="Where the distillation run goes. [default: <out>.run, beside the bundle]")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider for validation.")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's choice).")
@click.option("--fp16", is_flag=True, help="Also write an FP16 copy of the graph (always for tensorrt).")
@click.option("--batch", help="tensorrt: batch profile MIN,OPT,MAX. [default: 1,1,4]")
@click.option("--seq", help="tensorrt: sequence profile MIN,OPT,MAX. [default: 1,128,512; with --past, within the model's positions]")
@click.option("--past", help="tensorrt: past-length profile MIN,OPT,MAX. [default: 0,128,512; with --seq, within the model's positions]")
@click.option("--workspace", type=click.IntRange(min=1), default=4096, show_default=True, help="tensorrt: workspace limit (MiB).")
@quantize_options
@click.option("--qat-steps", "qat_steps", type=int, default=None,
              help="With --quantize int8, int8-dynamic, int4-weight or fp8 (tensorrt): a last distillation stage of N "
                   "steps with the Linear layers fake-quantized as the --target's graph quantizes them (weights; int8 "
                   "and fp8: input activations too), under the same KL budget, so the exported student is trained "
                   "around the rounding. [default: 0, none]")
@gate_options
@distill_options
@handle_errors(resumable=True)
def build_cmd(target, out, run_dir, provider, opset, fp16, batch, seq, past, workspace, recipe, resume, overwrite,
              as_json, **flags):
    """Distill → export ONNX → audit → bundle → validate. Accepts every `distill` flag.

    Exit code: 0 validation passed (and target sparsity reached), 1 failed, 2 bad input.
    """
    from ..exporters.trt_profiles import Profile
    from ..pipeline import BuildOptions, build
    from ..validate.report import print_table

    gates = gates_from(flags)
    cfg = config_from_flags(recipe, None, flags, require_out=False,  # build chooses the run dir
                            extra=quantize_flags(flags) | _qat_flags(flags, target))
    # Check profile shapes before hours of distillation (the model's position limit is checked again later).
    profile = Profile.from_cli(batch, seq, past, None) if (batch or seq or past) else None
    reporter = RichReporter()
    res = build(cfg, out, BuildOptions(target=target, provider=provider, opset=opset, fp16=fp16, run_dir=run_dir,
                                       overwrite=overwrite, resume=resume, profile=profile, workspace_mib=workspace),
                reporter, gates)
    if as_json:
        stdout_json(res.to_dict())
    elif res.validation is not None:
        print_table(res.validation.to_dict(), reporter.console)
        if res.quantized_validation is not None:
            print_table(res.quantized_validation.to_dict(), reporter.console)
    if res.shortfall:
        print_error(res.shortfall)
    from ..core.distributed import leave_together

    leave_together()  # under a launcher the other ranks wait here while the main process exports and validates
    sys.exit(0 if res.passed else 1)


def _qat_flags(flags: dict, target: str) -> dict:
    """--qat-steps, and the runtime a QAT stage (flag or recipe) simulates: this build's target (an onnxruntime and a
    tensorrt int8 graph round activations differently). Without QAT the setting is unused."""
    return {"qat_steps": flags.pop("qat_steps", None),
            "qat_target": target if target in ("onnxruntime", "tensorrt") else None}
