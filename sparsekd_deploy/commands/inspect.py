"""``sparsekd-deploy inspect BUNDLE``: manifest, sparsity, gates and the last verdict."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from ..cli import handle_errors
from ..console import stdout_json


@click.command("inspect")
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and last validation as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip checksum verification (faster on huge bundles).")
@handle_errors
def inspect_cmd(bundle, as_json, no_verify):
    """Show what a bundle holds and how it last validated."""
    from ..bundle import Bundle

    b = Bundle.open(bundle, verify=not no_verify)
    validation = json.loads((b.path / "validation.json").read_text()) if (b.path / "validation.json").exists() else None
    if as_json:
        stdout_json({"manifest": b.manifest, "validation": validation})
        return
    m = b.manifest
    con = Console()
    t = Table(title=f"bundle {m['name']} (schema {m['schema_version']}, {m['created']})", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    d = m["distillation"]
    t.add_row("model", f"{m['model']['architecture']}, {m['student']['parameters']['student']:,} parameters "
                       f"(teacher {m['student']['parameters']['teacher']:,})")
    t.add_row("pattern", f"{m['pattern']}: {m['achieved_sparsity']:.1%} sparsity, stage {d['final_stage']}/{d['stages']} "
                         f"({'target reached' if d['reached_target'] else 'stopped early: ' + d['reason']})")
    t.add_row("distillation", f"held-out KL {d['kl']:.4f}, top-1 {d['top1']:.3f}")
    t.add_row("export", f"{m['model']['exporter']} opset {m['model']['opset']}, KV cache {m['model']['with_past']}"
                        + (", FP16 copy" if m["model"].get("onnx_fp16") else ""))
    for prec, p in m.get("parity", {}).items():
        t.add_row(f"parity {prec}", f"max |Δlogit| {p['max_abs_logit_diff']:.2e}, KL {p['kl']:.2e}")
    if "engine" in m:
        e = m["engine"]
        t.add_row("engine", f"TensorRT {e['tensorrt_version']} on {e['device_name']} (sm {e['compute_capability']}), "
                            f"{e['precision']}, SPARSE_WEIGHTS {'on' if e['sparse_weights'] else 'off'}: "
                            f"{e['sparsity_summary']}" + (f" (built with {e['built_with']})" if e.get("built_with") else ""))
        if e.get("profile"):
            t.add_row("engine shapes", ", ".join(f"{axis} {r['min']}–{r['max']} (opt {r['opt']})"
                                                 for axis, r in e["profile"].items()))
    elif m["target"]["runtime"] == "tensorrt":
        t.add_row("engine", "not built yet: it is built on the device (`sparsekd-deploy engine build BUNDLE`; "
                            "trtexec lines in engine_build.json)")
    t.add_row("files", f"{len(m['files'])} files, {sum(f['bytes'] for f in m['files'].values()) / 1e6:.1f} MB, "
                       f"{'checksums verified' if not no_verify else 'not verified'}")
    if validation:
        verdict = "[green]PASS[/green]" if validation["passed"] else "[red]FAIL[/red]"
        failed = [g["gate"] for g in validation["gates"] if not g["passed"]]
        t.add_row("last validation", f"{verdict} on {validation['runtime'].get('runtime')} "
                                     f"({validation['runtime'].get('provider', '')}) at {validation['created']}"
                                     + (f"; failed: {', '.join(failed)}" if failed else ""))
        mm = validation["metrics"]
        t.add_row("metrics", f"kl_topk {mm['kl_topk']:.4f}, top-1 {mm['top1_agreement']:.3f}, greedy match "
                             f"{mm['greedy_match']:.2f}, ppl ratio {mm['ppl_ratio']:.3f}, consistency ratio "
                             f"{mm['consistency_ratio']:.3f}")
    else:
        t.add_row("last validation", "never validated")
    con.print(t)
