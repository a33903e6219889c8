"""Stability benchmark (issue 11): repeat-prompt jitter, sensitivity to prompt edits and low confidence / calibration,
with 95 % BCa bootstrap intervals over prompts, for the teacher, a one-shot + KD student and the staged students, on the
demo teacher and the second (wide) teacher.

Students come from ``bench_matrix.py``'s cells (same configs, same data-free distillation sets, same step budget:
``--steps`` optimizer steps, one-shot + KD 1 × steps, staged 3 × steps/3), one seed. The teacher's references are
recorded exactly as ``build`` records a bundle's (``validate.references.record``) on teacher samples the distiller
never saw (``bench_matrix.make_test_set``: seed + 10 000), and every model — the teacher included — is measured by the
same code ``validate`` runs on the device (``validate.stability.measure``) through a ``Target``: here the PyTorch CPU
target (``TorchTarget.from_model``, fp32; the exported ONNX matches it to 2e-5 in logits, README), so no export is
needed. kl_topk is reported beside the stability numbers: steadiness only counts while KL is small.

Each finished row is cached in ``<out>/<model>/<pattern>/<method>.json`` (a rerun with the same settings skips it).
Writes ``<out>/results.md`` (the table, also printed) and ``<out>/results.json``.

    .venv/bin/python scripts/bench_stability.py [--models demo wide] [--pattern unstructured:0.8] [--steps 90]
                                                [--samples 256] [--threads 1]
    .venv/bin/python scripts/bench_stability.py --quick           # smoke run: 4 steps, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_matrix as BM  # noqa: E402

ROOT = SCRIPTS.parent
METHODS = ["oneshot-kd", "staged", "staged-loadpath"]
SEED = 0


def teacher_references(teacher, tokenizer, test_ids: torch.Tensor, samples: int, prompts: int, out: Path):
    """The references ``build`` would record, on the test set's sequences; returns ``References``."""
    from safetensors.numpy import load_file

    from sparsekd_deploy.validate.references import META, TENSORS, References, RefSettings, record

    s = RefSettings(prompts=prompts, stability_prompts=prompts, stability_samples=samples,
                    length=min(RefSettings.length, test_ids.shape[1]))
    record(teacher, test_ids, out, s, tokenizer=tokenizer)
    return References(load_file(str(out / TENSORS)), json.loads((out / META).read_text()))


def measure(model, refs, samples: int) -> dict:
    """What ``validate`` measures, through a ``Target`` wrapping the PyTorch model: KL and the stability block."""
    from sparsekd_deploy.targets.torch_cuda import TorchTarget
    from sparsekd_deploy.validate import stability
    from sparsekd_deploy.validate.metrics import distribution_metrics

    target = TorchTarget.from_model(model.to("cpu").float().eval())
    logits = target.logits(refs.tensors["input_ids"])
    dist = distribution_metrics(logits, refs)
    _, stab, _ = stability.measure(target, refs, logits, samples)
    return {"kl_topk": dist["kl_topk"], "top1_agreement": dist["top1_agreement"], "stability": stab,
            **stability.ratios(stab)}


def train_and_measure(cell, teacher_path: Path, run: Path, steps: int, sizes: dict, kl_budget: float, refs,
                      samples: int) -> tuple[dict, dict]:
    """(the distiller's summary, the measurements) of one bench_matrix cell; its run dir is deleted afterwards."""
    cfg = BM.cell_config(cell, teacher_path, run, steps, sizes, kl_budget)
    BM.clear_run(run)
    try:
        student, summary = BM.run_trained(cfg)
        return summary, measure(student, refs, samples)
    finally:
        BM.clear_run(run)


# -- the table -----------------------------------------------------------------------------------------------------
def iv(d: dict | None, fmt: str = ".3f") -> str:
    if not d or d.get("value") is None:
        return "–"
    if d.get("low") is None:
        return f"{d['value']:{fmt}}"
    return f"{d['value']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def row_cells(rec: dict) -> list[str]:
    st = rec["stability"]
    j, sens, c = st["jitter"], st["sensitivity"] or {}, st["confidence"]
    m = j["m"]
    has_sens = "ratio" in sens
    s_c, t_c = c["student"], c["teacher"]
    control = (sens.get("control") or {}).get("ratio")
    return [f"{max(rec['kl_topk'], 0.0):.4f}", iv(j["student"][f"jitter@{m}"]), iv(j["ratio"]),
            iv(j.get("agreement_ratio")), iv(j["student"]["mean_entropy"]),
            iv(sens["student"]["kl"], ".4f") if has_sens else "skipped", iv(sens.get("ratio")),
            iv(sens.get("excess_kl"), ".4f"), iv(control),
            iv(s_c["low_confidence"]), iv(c["ratio"]), iv(s_c.get("mean_top1_prob")),
            f"{iv(s_c.get('ece_next_token'))} / {iv(t_c.get('ece_next_token'))}",
            iv(c.get("nll_next_token_difference"))]


def markdown(results: dict, note: str) -> str:
    head = ["model", "pattern", "method", "kl_topk", "jitter@2 [95% CI]", "× teacher", "agreement × teacher",
            "sampling entropy (nats)", "sensitivity KL (4 edits)", "× teacher", "excess KL vs teacher",
            "'.' control × teacher", "low confidence (p<0.3)", "× teacher", "mean top-1 p",
            "ECE vs next token (model / teacher)", "NLL − teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for model, rows in results.items():
        for rec in rows:
            lines.append("| " + " | ".join([model, rec["pattern"], rec["label"], *row_cells(rec)]) + " |")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "wide"])
    ap.add_argument("--pattern", default="unstructured:0.8",
                    help="where staging pays on both teachers (README: the issue 9 matrix)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=list(BM.METHODS))
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--samples", type=int, default=256, help="repeat-prompt samples per prompt (teacher and students)")
    ap.add_argument("--prompts", type=int, default=16, help="reference prompts (stability and KL / confidence)")
    ap.add_argument("--kl-budget", type=float, default=1000.0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 steps, tiny data, 16 samples × 4 prompts")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = BM.SIZES["quick" if args.quick else "full"]
    if args.quick:
        args.steps, args.samples, args.prompts = 4, 16, 4
    root = args.out or ROOT / "runs" / ("bench_stability_quick" if args.quick else "bench_stability")
    # "measurement" changes whenever what is measured does (a cached row of an older measurement is redone)
    settings = {"measurement": 2, "steps": args.steps, "samples": args.samples, "prompts": args.prompts,
                "kl_budget": args.kl_budget, "seed": SEED, **sizes}
    BM.share_distillation_sets()
    from sparsekd_deploy.fsutil import write_json_atomic
    from sparsekd_deploy.models.loading import load_model, load_tokenizer

    results: dict[str, list[dict]] = {}
    began = time.perf_counter()
    for model in args.models:
        path = BM.teacher_dir(model)
        teacher = load_model(path, role="teacher")
        tokenizer = load_tokenizer(path, required=False)
        test = BM.make_test_set(teacher, tokenizer, SEED, sizes)
        refs = teacher_references(teacher, tokenizer, test.ids, args.samples, args.prompts, root / model)
        BM.prime_distillation_set(path, teacher, tokenizer, SEED, sizes)
        rows = []
        for method in ["teacher", *args.methods]:
            cache = root / model / BM.slug(args.pattern) / f"{method}.json"
            try:
                rec = json.loads(cache.read_text())
                if rec.get("settings") != settings:
                    rec = None
            except (OSError, ValueError):
                rec = None
            if rec is None:
                t0 = time.perf_counter()
                if method == "teacher":
                    summary, measured = {}, measure(teacher, refs, args.samples)
                else:
                    cell = BM.Cell(model, args.pattern, method, SEED)
                    summary, measured = train_and_measure(cell, path, cell.run_dir(root), args.steps, settings,
                                                          args.kl_budget, refs, args.samples)
                rec = {"model": model, "pattern": "dense" if method == "teacher" else args.pattern, "method": method,
                       "label": "teacher" if method == "teacher" else BM.METHODS[method]["label"],
                       "settings": settings, "distiller": summary, **measured,
                       "seconds": round(time.perf_counter() - t0, 1)}
                cache.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(cache, rec)
            rows.append(rec)
            j = rec["stability"]["jitter"]
            print(f"{model} {rec['label']}: kl_topk {rec['kl_topk']:.4f}, jitter ratio {iv(j['ratio'])}, sensitivity "
                  f"ratio {iv((rec['stability']['sensitivity'] or {}).get('ratio'))}, low-confidence ratio "
                  f"{iv(rec['stability']['confidence']['ratio'])} ({rec['seconds']} s; elapsed "
                  f"{time.perf_counter() - began:.0f} s)", flush=True)
        results[model] = rows
    note = (f"One seed ({SEED}); students: {args.pattern}, {args.steps} optimizer steps (one-shot + KD 1 × {args.steps}, "
            f"staged 3 × {args.steps // 3}), data-free, as in bench_matrix.py. References as `build` records them, on "
            f"{args.prompts} prompts of teacher samples the distiller never saw; jitter: {args.samples} samples per "
            f"prompt at τ = 0.7, first 2 tokens, sample j of prompt p seeded p·{args.samples} + j for every model; "
            f"agreement: pairwise agreement of the first 2 tokens (> 1: the student agrees with itself more); "
            f"sensitivity: 4 meaning-preserving prompt edits, KL(original‖edited) of the next-token distribution; "
            f"excess KL: KL(T(x′)‖S(x′)) − KL(T(x)‖S(x)) over the teacher's top-32 buckets, mean over the 4 edits; "
            f"'.' control: a final '.' added (not meaning-preserving for the next token), kept out of the sensitivity; "
            f"low confidence: share of positions with top-1 p < 0.3; ECE (10 bins) and NLL of the top-1 against the "
            f"reference text's next token (here teacher samples: the teacher is calibrated on them by construction, "
            f"and NLL − teacher estimates KL(T‖S)). [..]: 95 % BCa bootstrap interval over prompts; × teacher: "
            f"paired ratio student / teacher (< 1: steadier than the teacher).")
    text = markdown(results, note)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(text)
    write_json_atomic(root / "results.json", {"settings": settings, "results": results})
    print("\n" + text, flush=True)
    print(f"wrote {root / 'results.md'} and {root / 'results.json'} ({time.perf_counter() - began:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
