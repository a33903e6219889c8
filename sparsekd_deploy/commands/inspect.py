"""``sparsekd-deploy inspect BUNDLE``: manifest, sparsity, gates and the last verdict."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..console import stdout_json
from .error_handling import handle_errors

NUM = (int, float)
_REQUIRED = object()


class _Fields:
    """Reads a (possibly hand-edited) manifest or report: a missing or mistyped field is one BundleError naming it."""

    def __init__(self, data: dict, where: str, fix: str):
        self.data, self.where, self.fix = data, where, fix

    def __call__(self, dotted: str, kind: type | tuple = object, default=_REQUIRED):
        from ..bundle import BundleError

        cur = self.data
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                if default is not _REQUIRED:
                    return default
                raise BundleError(f"{self.where} has no {dotted}; {self.fix}")
            cur = cur[part]
        if not isinstance(cur, kind) or (isinstance(cur, bool) and kind is NUM):
            names = kind.__name__ if isinstance(kind, type) else "number"
            raise BundleError(f"{self.where}: {dotted} is {cur!r}, not a {names}; {self.fix}")
        return cur


@click.command("inspect")
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and last validation as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip checksum verification (faster on huge bundles).")
@handle_errors
def inspect_cmd(bundle, as_json, no_verify):
    """Show what a bundle holds and how it last validated."""
    from ..bundle import MANIFEST, VALIDATION, Bundle

    b = Bundle.open(bundle, verify=not no_verify)
    validation = b.read_validation()
    if as_json:
        stdout_json({"manifest": b.manifest, "validation": validation})
        return
    f = _Fields(b.manifest, f"{b.path / MANIFEST}", "rebuild the bundle with `sparsekd-deploy build`")
    con = Console()
    t = Table(title=f"bundle {f('name')} (schema {f('schema_version')}, {f('created')})", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{f('model.architecture')}, {f('student.parameters.student', int):,} parameters "
                       f"(teacher {f('student.parameters.teacher', int):,})")
    reached = f("distillation.reached_target", bool)
    t.add_row("pattern", f"{f('pattern')}: {f('achieved_sparsity', NUM):.1%} sparsity, stage "
                         f"{f('distillation.final_stage')}/{f('distillation.stages')} "
                         f"({'target reached' if reached else 'stopped early: ' + str(f('distillation.reason'))})")
    t.add_row("distillation", f"held-out KL {f('distillation.kl', NUM):.4f}, top-1 {f('distillation.top1', NUM):.3f}")
    t.add_row("export", f"{f('model.exporter')} opset {f('model.opset')}, KV cache {f('model.with_past')}"
                        + (", FP16 copy" if f("model.onnx_fp16", default=None) else ""))
    if fusion := _fusion_line(f("model.attention_fusion", dict, default=None)):
        t.add_row("ORT fusions", escape(fusion))
    _precision_rows(t, b, f, validation)
    for prec in f("parity", dict, default={}):
        t.add_row(f"parity {prec}", f"max |Δlogit| {f(f'parity.{prec}.max_abs_logit_diff', NUM):.2e}, "
                                    f"KL {f(f'parity.{prec}.kl', NUM):.2e}")
    if "engine" in b.manifest:
        e = _Fields(f("engine", dict), f"{b.path / MANIFEST} (engine)", "re-add the engine with `engine add`")
        t.add_row("engine", f"TensorRT {e('tensorrt_version')} on {e('device_name')} (sm {e('compute_capability')}), "
                            f"{e('precision')}, SPARSE_WEIGHTS {'on' if e('sparse_weights') else 'off'}: "
                            f"{e('sparsity_summary')}"
                            + (f" (built with {e('built_with')})" if e("built_with", default=None) else ""))
        profile = e("profile", dict, default=None)
        if profile:
            t.add_row("engine shapes", ", ".join(f"{axis} {e(f'profile.{axis}.min')}–{e(f'profile.{axis}.max')} "
                                                 f"(opt {e(f'profile.{axis}.opt')})" for axis in profile))
    elif f("target.runtime") == "tensorrt":
        t.add_row("engine", "not built yet: it is built on the device (`sparsekd-deploy engine build BUNDLE`; "
                            "trtexec lines in engine_build.json)")
    files = b.meta.files
    t.add_row("files", f"{len(files)} files, {sum(x.bytes for x in files.values()) / 1e6:.1f} MB, "
                       f"{'checksums verified' if not no_verify else 'not verified'}")
    if unlisted := b.unlisted_note():
        t.add_row("unlisted", escape(unlisted))  # file names are text, not rich markup
    if validation:
        v = _Fields(validation, f"{b.path / VALIDATION}", "delete it and rerun `sparsekd-deploy validate`")
        verdict = "[green]PASS[/green]" if v("passed", bool) else "[red]FAIL[/red]"
        failed = [g.get("gate", "?") for g in v("gates", list) if isinstance(g, dict) and not g.get("passed")]
        t.add_row("last validation", f"{verdict} on {v('runtime.runtime', default=None)} "
                                     f"({v('runtime.provider', default='')}) at {v('created')}"
                                     + (f"; failed: {', '.join(map(str, failed))}" if failed else ""))
        t.add_row("metrics", f"kl_topk {v('metrics.kl_topk', NUM):.4f}, top-1 {v('metrics.top1_agreement', NUM):.3f}, "
                             f"greedy match {v('metrics.greedy_match', NUM):.2f}, ppl ratio "
                             f"{v('metrics.ppl_ratio', NUM):.3f}, consistency ratio "
                             f"{v('metrics.consistency_ratio', NUM):.3f}")
        t.add_row("stability", _stability_line(v("metrics.stability", dict, default=None)))
    else:
        t.add_row("last validation", "never validated")
    con.print(t)


def _fusion_line(record: dict | None) -> str | None:
    """What the onnxruntime target's graphs hold (``model.attention_fusion``), one clause per graph file."""
    if not record:
        return None

    def section(key: str, name: str):  # a hand-edited record may hold anything: only dicts are read
        value = record.get(key)
        return value.get(name) if isinstance(value, dict) else None

    parts = []
    for name, layers in record.items():
        if not (name.endswith(".onnx") and isinstance(layers, int)):
            continue  # op / rewriter / the per-file sections below
        clause = f"{name}: attention in {layers} layers"
        ort = section("ort_fusions", name)
        if isinstance(ort, dict):
            clause += "".join(f", {op} {n}" for op, n in ort.items() if isinstance(n, int) and n)
        blocks = section("query_blocks", name)
        if isinstance(blocks, dict) and blocks.get("layers"):
            clause += f", prompts of {blocks.get('from_queries')}+ tokens in query blocks of {blocks.get('block')}"
        skipped = section("skipped", name) or section("ort_fusions_skipped", name)
        if skipped:
            clause += f" ({skipped})"
        parts.append(clause)
    return "; ".join(parts) or None


def _precision_rows(t: Table, b, f: _Fields, validation: dict | None) -> None:
    """One row per graph the bundle carries: file size (× fp32) and its last validation, where it has one."""
    from ..precisions import PRECISIONS, manifest_key
    from ..validate.validator import per_model_record

    files = b.meta.files
    fp32 = files.get(f("model.onnx", str))
    for precision in PRECISIONS:
        rel = f(f"model.{manifest_key(precision)}", default=None)
        if not isinstance(rel, str) or rel not in files:
            continue
        size = files[rel].bytes
        ratio = f" ({size / fp32.bytes:.2f}× fp32)" if fp32 and precision != "fp32" else ""
        last = b.read_json(per_model_record(rel), "validation record", "delete it and rerun `sparsekd-deploy validate`")
        if last is None and validation and validation.get("model") == rel:
            last = validation
        if last is None:
            seen = "not validated yet" + (f" (`sparsekd-deploy validate BUNDLE --model {precision}`)"
                                          if precision != "fp32" else "") + "; decode speed not measured"
        else:
            v = _Fields(last, f"{b.path / per_model_record(rel)}", "delete it and rerun `sparsekd-deploy validate`")
            kl_full = v("metrics.kl_full", default=None)
            seen = (f"{'PASS' if v('passed', bool) else 'FAIL'}: kl_topk {v('metrics.kl_topk', NUM):.4f}"
                    + (f", full KL {kl_full:.4f}" if isinstance(kl_full, NUM) else "")
                    + f", top-1 {v('metrics.top1_agreement', NUM):.3f}, greedy {v('metrics.greedy_match', NUM):.2f}"
                    f"; {_decode_speed(v)} ({v('created')})")
        t.add_row(f"graph {precision}", f"{rel}, {size / 1e6:.1f} MB{ratio}; {seen}")
    q = f("quantization", dict, default=None)
    if q:
        calib = q.get("calibration") or {}
        how = f"{q.get('quantizer')}: weights {q.get('weights')}, activations {q.get('activations')}"
        if calib:
            how += (f"; calibration {calib.get('method')} on {calib.get('sequences')} × {calib.get('tokens_per_sequence')}"
                    f" training tokens")
        t.add_row("quantization", how + (f"; not quantized: {len(q.get('skipped') or [])} layers"
                                         if q.get("skipped") else ""))


def _decode_speed(v: _Fields) -> str:
    """The greedy decode speed the validation measured, with where (validations before it existed: not measured)."""
    rate = v("metrics.decode.tokens_per_s", NUM, default=None)
    if rate is None:
        return "decode speed not measured"
    where = f"{v('runtime.runtime', str, default='?')} {v('runtime.provider', str, default='')}".strip()
    return f"decode {rate:.1f} tok/s (batch 1, {v('metrics.decode.new_tokens', NUM, default='?')} tokens, {where})"


def _stability_line(stab: dict | None) -> str:
    """student/teacher ratios with their 95 % intervals (below 1: the student is steadier)."""
    if not stab:
        return "not measured (validated before the stability measurements existed)"
    parts = []
    for key, label in (("jitter", "jitter"), ("sensitivity", "sensitivity"), ("confidence", "low confidence")):
        ratio = (stab.get(key) or {}).get("ratio") if isinstance(stab.get(key), dict) else None
        if isinstance(ratio, dict) and all(isinstance(ratio.get(k), NUM) for k in ("value", "low", "high")):
            parts.append(f"{label} {ratio['value']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]")
        else:
            parts.append(f"{label} —")
    return "student/teacher " + ", ".join(parts)
