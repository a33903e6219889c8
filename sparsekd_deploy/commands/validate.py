"""``sparsekd-deploy validate BUNDLE``: re-check a bundle on a runtime; the exit code is the verdict."""

from __future__ import annotations

import sys

import click

from ..console import err_console, print_error, stdout_json
from .error_handling import handle_errors
from .gates import gate_options, gates_from


@click.command("validate")
@click.argument("bundle", type=click.Path())
@click.option("--runtime", type=click.Choice(["onnxruntime", "tensorrt", "torch"]), default="onnxruntime",
              show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--model", help="Which graph in the bundle: a file (model.int8.onnx) or a precision the manifest records "
              "(fp32, fp16, int8, int8-dynamic, int4-weight, fp8). [default: model.onnx]")
@click.option("--teacher", type=click.Path(), help="The teacher's model dir: also measure the full-vocabulary KL "
              "(it must be the teacher the bundle was distilled from).")
@click.option("--json", "as_json", is_flag=True, help="Print validation.json on stdout.")
@click.option("--no-plots", is_flag=True, help="Write no PNG plots (they need matplotlib; skipped anyway without it).")
@click.option("--samples", type=click.IntRange(min=2), default=None,
              help="Repeat-prompt samples per prompt for the jitter measurement, with 95% bootstrap intervals; run in "
                   "chunks that fit the runtime, compared with the teacher's stored samples (at most 256). "
                   "[default: the references' 16]")
@gate_options
@handle_errors
def validate_cmd(bundle, runtime, provider, model, teacher, as_json, no_plots, samples, **kw):
    """Validate BUNDLE against its stored teacher references. Exit 0 pass, 1 fail, 2 usage/bundle error."""
    from ..bundle import Bundle
    from ..validate.report import print_table
    from ..validate.validator import validate_bundle

    gates = gates_from(kw)
    b = Bundle.open(bundle)
    report = validate_bundle(b, runtime, provider, gates, model=model, teacher=teacher, plots=not no_plots,
                             samples=samples)
    if as_json:
        stdout_json(report.to_dict())
    else:
        print_table(report.to_dict(), err_console)
    if unlisted := b.unlisted_note():
        err_console.print(f"note: {unlisted}", markup=False, highlight=False, soft_wrap=True)
    if report.plots_skipped_because:
        err_console.print(f"note: {report.plots_skipped_because}", markup=False, highlight=False)
    if not report.recorded:
        print_error(f"{report.not_recorded_because}; the exit code still gives the verdict")
    sys.exit(0 if report.passed else 1)
