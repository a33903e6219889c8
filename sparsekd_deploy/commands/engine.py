"""``sparsekd-deploy engine build BUNDLE``: build the TensorRT engine on this device and add it to the bundle."""

from __future__ import annotations

from pathlib import Path

import click

from ..console import err_console, stdout_json
from ..exporters.trt_precision import ENGINE_PRECISIONS
from .error_handling import handle_errors


@click.group("engine")
def engine_group():
    """TensorRT engines (built on the device that runs them)."""


@engine_group.command("build")
@click.argument("bundle", type=click.Path())
@click.option("--batch", help="Batch profile MIN,OPT,MAX. [default: 1,1,4]")
@click.option("--seq", help="Sequence profile MIN,OPT,MAX. [default: 1,128,512; with --past, within the model's positions]")
@click.option("--past", help="Past-length profile MIN,OPT,MAX. [default: 0,128,512; with --seq, within the model's positions]")
@click.option("--workspace", type=click.IntRange(min=1), default=4096, show_default=True, help="Workspace limit in MiB.")
@click.option("--fp32", is_flag=True, help="Build FP32 instead of FP16.")
@click.option("--dense", is_flag=True, help="Do not enable SPARSE_WEIGHTS.")
@click.option("--precision", type=click.Choice(ENGINE_PRECISIONS),
              help="Engine precision. int8 / fp8 / int4-weight build from the bundle's Q/DQ graph (explicit "
                   "quantization, no calibrator; fp8 needs compute capability 8.9+). [default: the bundle's quantized "
                   "graph when it has one for TensorRT, else fp16 (fp32 with --fp32)]")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def engine_build_cmd(bundle, batch, seq, past, workspace, fp32, dense, precision, as_json):
    """Build engine.plan for this GPU, with a sparsity report (eligible vs sparse-tactic layers)."""
    from ..bundle import Bundle
    from ..exporters.trt_profiles import Profile

    b = Bundle.open(bundle)
    profile = Profile.from_cli(batch, seq, past, b.manifest["model"].get("max_positions"))
    from ..pipeline.engine import build_into_bundle

    res = build_into_bundle(b, profile, fp16=not fp32, sparse=not dense, workspace_mib=workspace, precision=precision)
    for w in res.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {w}")
    if as_json:
        stdout_json({"engine": res.engine, "sparsity": res.sparsity})
    else:
        err_console.print(f"engine.plan built with TensorRT {res.engine['tensorrt_version']} for "
                          f"{res.engine['device_name']} (sm {res.engine['compute_capability']}), "
                          f"{res.engine['precision']}: {res.sparsity['summary']}")


@engine_group.command("add")
@click.argument("bundle", type=click.Path())
@click.option("--plan", "plan", required=True, type=click.Path(), help="The engine trtexec wrote (--saveEngine).")
@click.option("--log", "log", type=click.Path(), help="trtexec's output (run with --verbose for the sparsity lines).")
@click.option("--layers", type=click.Path(), help="The JSON trtexec wrote with --exportLayerInfo.")
@click.option("--compute-capability", help="The building GPU's, e.g. 8.7 (default: from the log, else this GPU).")
@click.option("--device-name", help="The building GPU's name (default: from the log, else this GPU).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def engine_add_cmd(bundle, plan, log, layers, compute_capability, device_name, as_json):
    """Add an engine built with trtexec (the line in engine_build.json) to the bundle, with its sparsity report."""
    from ..bundle import Bundle
    from ..pipeline.engine_register import register_engine

    b = Bundle.open(bundle)
    record, report = register_engine(b, Path(plan), log=Path(log) if log else None,
                                     layers=Path(layers) if layers else None,
                                     compute_capability=compute_capability, device_name=device_name)
    if as_json:
        stdout_json({"engine": record, "sparsity": report})
    else:
        err_console.print(f"engine.plan added: TensorRT {record['tensorrt_version']}, {record['device_name'] or '?'} "
                          f"(sm {record['compute_capability']}), {record['precision']}: {report['summary']}")
