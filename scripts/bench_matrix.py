"""Benchmark matrix (issue 9, part 1): patterns × methods × seeds on two teachers, at one optimizer-step budget,
every final student measured on a test set that the distiller never saw.

Cells are (model, pattern, method, seed). Methods:

- ``magnitude`` / ``wanda``: one-shot prune straight to the pattern, no training (post-training baselines);
- ``oneshot-kd``: one-shot Wanda, then all ``--steps`` optimizer steps of KD (``stages=1, steps_per_stage=N``);
- ``staged``: the staged recipe (``STAGED_STAGES`` = 3 stages, the config's default for continuous patterns,
  ``steps_per_stage = N // 3``);
- ``staged-loadpath``: ``staged`` with ``allocation="loadpath"`` (unstructured patterns only; "unsupported" when
  the config does not know the option).

Every trained run gets ``retries=0`` and a KL budget no stage can break (``--kl-budget``), so all trained methods
spend exactly the same steps and reach the target pattern. The distiller keeps the best held-out state of each stage,
i.e. it *selects* on its own held-out set; the benchmark therefore scores every student on a separate test set:
per (model, seed), sequences sampled from the teacher with seed ``seed + 10_000`` (full-vocabulary KL(teacher‖student),
top-1 agreement, and the mean sampling entropy at τ = 1 on test prefixes, student vs teacher). The distiller's own
summary (held-out KL, reached target, final stage, sparsity) is recorded beside it.

Each finished cell is cached in ``<out>/<model>/<pattern>/<method>/seed<k>.json`` (written atomically) and a rerun
with the same settings skips it, so a stopped matrix resumes; a cell's run dir is deleted once it is measured.
Writes ``<out>/results.md``, ``<out>/results.json`` and ``<out>/kl_vs_sparsity_<model>.png``.

Sizing (smoke runs on the shared 2-core machine, load ~3, ``--threads 1``, both teachers alike): a one-shot cell
~4 s; a trained cell ~8 s (one-shot + KD) / ~16 s (staged; +8 s with load-path allocation) plus ~0.42 s per optimizer
step; sampling each (model, seed)'s distillation + test sets ~12-19 s. The full matrix (96 cells: 39 one-shot, 57
trained) is then about 1060 s + 24 s × steps: ~55 min at the default 90 steps, ~66 min at 120.

    .venv/bin/python scripts/bench_matrix.py [--models demo wide] [--steps 90] [--seeds 0 1 2] [--threads 1]
    .venv/bin/python scripts/bench_matrix.py --quick                 # smoke run (a few steps, tiny data)
    .venv/bin/python scripts/bench_matrix.py --list                  # the cells and what is cached
    .venv/bin/python scripts/bench_matrix.py --report-only           # tables and plots from the cache
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from sparsekd_deploy.config import DistillConfig, build_config, default_stages  # noqa: E402
from sparsekd_deploy.errors import ConfigError  # noqa: E402

ROOT = SCRIPTS.parent
TEST_SEED_OFFSET = 10_000
REF = "oneshot-kd"  # the baseline every ratio and paired difference is taken against

# Stages of the `staged` methods: the config's default for unstructured / channel patterns (for n:m the default is
# one stage, which is the `oneshot-kd` row).
STAGED_STAGES = 3

METHODS: dict[str, dict] = {
    "magnitude": {"label": "magnitude one-shot", "kind": "oneshot", "importance": "magnitude"},
    "wanda": {"label": "Wanda one-shot", "kind": "oneshot", "importance": "wanda"},
    # uniform named explicitly: these rows keep meaning one sparsity for every layer whatever the config's default
    "oneshot-kd": {"label": "one-shot Wanda + KD", "kind": "trained", "staged": False,
                   "overrides": {"allocation": "uniform"}},
    "staged": {"label": "staged (uniform)", "kind": "trained", "staged": True, "overrides": {"allocation": "uniform"}},
    "staged-loadpath": {"label": "staged + load-path", "kind": "trained", "staged": True,
                        "overrides": {"allocation": "loadpath"}, "only": ("unstructured",)},
    # Separates what load-path allocation buys from what staging buys (not in the default matrix; --methods).
    "oneshot-kd-loadpath": {"label": "one-shot + KD + load-path", "kind": "trained", "staged": False,
                            "overrides": {"allocation": "loadpath"}, "only": ("unstructured",)},
    # Masks learned through the KD loss in the first half of each stage (SR-STE, core/mask_learning.py).
    "oneshot-kd-srste": {"label": "one-shot + KD, SR-STE masks", "kind": "trained", "staged": False,
                         "overrides": {"allocation": "uniform", "mask_learning": "sr-ste"}},
    "staged-srste": {"label": "staged, SR-STE masks", "kind": "trained", "staged": True,
                     "overrides": {"allocation": "uniform", "mask_learning": "sr-ste"}},
    # Every other row trains at the configured lr (lr_search off); these are the default recipes with the run's lr
    # chosen by a range test on the first stage (core/lr_search.py; its trial steps are extra compute).
    # Channel staging variants (issue 9's channels bar; --methods): how the 90 steps and the removal are split.
    "staged-equal": {"label": "staged, equal steps", "kind": "trained", "staged": True,
                     "overrides": {"allocation": "uniform", "step_schedule": "equal"}},
    "staged-linear": {"label": "staged, linear shares", "kind": "trained", "staged": True,
                      "overrides": {"allocation": "uniform", "sparsity_schedule": "linear"}},
    "staged2": {"label": "2 stages", "kind": "trained", "staged": True, "stages": 2,
                "overrides": {"allocation": "uniform"}},
    # Gradual demolition (core/demolition.py): each stage's removal fades out over the first half of its steps.
    "oneshot-kd-gradual": {"label": "one stage, gradual demolition", "kind": "trained", "staged": False,
                           "overrides": {"allocation": "uniform", "demolition": "gradual"}},
    "staged-gradual": {"label": "staged, gradual demolition", "kind": "trained", "staged": True,
                       "overrides": {"allocation": "uniform", "demolition": "gradual"}},
    # Channels scored by the empirical Fisher of a gate on each channel (importance "fisher"), not Wanda's weight sums.
    "fisher": {"label": "Fisher one-shot", "kind": "oneshot", "importance": "fisher", "only": ("channels",)},
    "oneshot-kd-fisher": {"label": "one-shot Fisher + KD", "kind": "trained", "staged": False,
                          "overrides": {"allocation": "uniform", "importance": "fisher"}, "only": ("channels",)},
    "staged2-fisher": {"label": "2 stages, Fisher", "kind": "trained", "staged": True, "stages": 2,
                       "overrides": {"allocation": "uniform", "importance": "fisher"}, "only": ("channels",)},
    "staged-fisher": {"label": "staged, Fisher", "kind": "trained", "staged": True,
                      "overrides": {"allocation": "uniform", "importance": "fisher"}, "only": ("channels",)},
    # + compensation "ls": each prune refits the output projections on the kept channels (core/compensation.py).
    "wanda-ls": {"label": "Wanda one-shot, LS refit", "kind": "oneshot", "importance": "wanda",
                 "overrides": {"compensation": "ls"}, "only": ("channels",)},
    "fisher-ls": {"label": "Fisher one-shot, LS refit", "kind": "oneshot", "importance": "fisher",
                  "overrides": {"compensation": "ls"}, "only": ("channels",)},
    "oneshot-kd-ls": {"label": "one-shot Wanda + LS refit + KD", "kind": "trained", "staged": False,
                      "overrides": {"allocation": "uniform", "compensation": "ls"}, "only": ("channels",)},
    "oneshot-kd-fisher-ls": {"label": "one-shot Fisher + LS refit + KD", "kind": "trained", "staged": False,
                             "overrides": {"allocation": "uniform", "importance": "fisher", "compensation": "ls"},
                             "only": ("channels",)},
    "staged2-fisher-ls": {"label": "2 stages, Fisher + LS refit", "kind": "trained", "staged": True, "stages": 2,
                          "overrides": {"allocation": "uniform", "importance": "fisher", "compensation": "ls"},
                          "only": ("channels",)},
    "staged-fisher-ls": {"label": "staged, Fisher + LS refit", "kind": "trained", "staged": True,
                         "overrides": {"allocation": "uniform", "importance": "fisher", "compensation": "ls"},
                         "only": ("channels",)},
    # The config's default recipe for the pattern (stages, importance, compensation, lr search all left open).
    "default": {"label": "default recipe", "kind": "trained", "default": True},
    "oneshot-kd-lrsearch": {"label": "one-shot + KD, lr search", "kind": "trained", "staged": False,
                            "overrides": {"allocation": "uniform", "lr_search": "on"}},
    "oneshot-kd-fisher-lrsearch": {"label": "one-shot Fisher + KD, lr search", "kind": "trained", "staged": False,
                                   "overrides": {"allocation": "uniform", "importance": "fisher", "lr_search": "on"},
                                   "only": ("channels",)},
    "staged2-fisher-lrsearch": {"label": "2 stages, Fisher, lr search", "kind": "trained", "staged": True,
                                "stages": 2, "overrides": {"allocation": "uniform", "importance": "fisher",
                                                           "lr_search": "on"}, "only": ("channels",)},
    "staged-loadpath-lrsearch": {"label": "staged + load-path, lr search", "kind": "trained", "staged": True,
                                 "overrides": {"allocation": "loadpath", "lr_search": "on"},
                                 "only": ("unstructured",)},
}

MODELS: dict[str, dict] = {
    "demo": {"patterns": ["2:4", "unstructured:0.5", "unstructured:0.8", "unstructured:0.9", "channels:0.5"],
             "methods": ["magnitude", "wanda", "oneshot-kd", "staged", "staged-loadpath"]},
    "wide": {"patterns": ["2:4", "unstructured:0.8", "channels:0.5"],
             "methods": ["wanda", "oneshot-kd", "staged"]},
}

# Data and measurement sizes: (full run, --quick).
SIZES = {
    "full": {"num_samples": 256, "heldout_samples": 32, "seq_len": 128, "test_samples": 64, "entropy_prompts": 16,
             "entropy_samples": 4, "entropy_tokens": 32},
    "quick": {"num_samples": 16, "heldout_samples": 8, "seq_len": 32, "test_samples": 8, "entropy_prompts": 2,
              "entropy_samples": 2, "entropy_tokens": 8},
}
# The distiller's own consistency measurement (per stage) is not used here: keep it as small as the config allows.
QUIET_CONSISTENCY = {"consistency_prompts": 1, "consistency_samples": 2, "consistency_tokens": 2, "consistency_m": 1,
                     "consistency_temperatures": [1.0]}


def teacher_dir(model: str) -> Path:
    from teachers import demo_teacher, second_teacher

    if model == "demo":
        return demo_teacher()
    if model == "wide":
        return second_teacher()
    path = Path(model)  # any other HF model dir works too (name = the dir's name)
    if not path.is_dir():
        raise SystemExit(f"unknown model {model!r}: use demo, wide, or a model dir")
    return path


def pattern_kind(pattern: str) -> str:
    head = pattern.split(":")[0]
    return head if head in ("unstructured", "channels") else "nm"


def pattern_sparsity(pattern: str) -> float:
    from sparsekd_deploy.core.patterns import make_pattern

    return make_pattern(pattern).target_sparsity()


def slug(pattern: str) -> str:
    return pattern.replace(":", "-")


def applies(method: str, pattern: str) -> bool:
    only = METHODS[method].get("only")
    return only is None or pattern_kind(pattern) in only


# -- the cells -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    model: str
    pattern: str
    method: str
    seed: int

    def path(self, root: Path) -> Path:
        return root / Path(self.model).name / slug(self.pattern) / self.method / f"seed{self.seed}.json"

    def run_dir(self, root: Path) -> Path:
        return self.path(root).with_suffix(".run")

    def name(self) -> str:
        return f"{Path(self.model).name} {self.pattern} {self.method} seed{self.seed}"


def plan_cells(models, patterns, methods, seeds) -> list[Cell]:
    """Seeds outermost: after the first seed every row of the table has a value."""
    cells = []
    for model in models:
        spec = MODELS.get(model, MODELS["wide"])
        for seed in seeds:
            for pattern in patterns or spec["patterns"]:
                for method in methods or spec["methods"]:
                    if applies(method, pattern):
                        cells.append(Cell(model, pattern, method, seed))
    return cells


def settings_of(args, sizes: dict) -> dict:
    """Everything a cached cell's numbers depend on besides the cell itself: a change makes the cache stale."""
    return {"steps": args.steps, "kl_budget": args.kl_budget, "lr": args.lr, "batch_size": args.batch_size,
            **sizes}


TRAINING_ONLY = ("steps", "kl_budget", "lr")


def cell_settings(cell: Cell, settings: dict) -> dict:
    """The settings a cell depends on: a one-shot cell does not train, so another step budget reuses it."""
    if METHODS[cell.method]["kind"] == "oneshot":
        return {k: v for k, v in settings.items() if k not in TRAINING_ONLY}
    return settings


def cell_config(cell: Cell, teacher: Path, out: Path, steps: int, sizes: dict, kl_budget: float,
                extra: dict | None = None) -> DistillConfig:
    """The DistillConfig of a cell (raises ConfigError when the config does not accept it)."""
    m = METHODS[cell.method]
    opts = dict(teacher=str(teacher), out=str(out), pattern=cell.pattern, seed=cell.seed, retries=0,
                kl_budget=kl_budget, num_samples=sizes["num_samples"], heldout_samples=sizes["heldout_samples"],
                seq_len=sizes["seq_len"], lr_search="off", **QUIET_CONSISTENCY)
    if m.get("default"):  # the config's own recipe for the pattern: its stages, criterion, refit and lr search
        stages = default_stages(cell.pattern)
        opts.update(stages=stages, steps_per_stage=max(1, steps // stages), lr_search="auto")
        return build_config(None, {**opts, **{k: v for k, v in (extra or {}).items() if v is not None}})
    # Every other row keeps the meaning it had before the channel defaults changed: Wanda, no refit, unless it says.
    opts.update(importance="wanda", compensation="off")
    if m["kind"] == "oneshot":
        opts["importance"] = m["importance"]
    elif m["staged"]:
        stages = m.get("stages", STAGED_STAGES)
        opts.update(stages=stages, steps_per_stage=max(1, steps // stages))
    else:
        opts.update(stages=1, steps_per_stage=steps)
    opts.update(m.get("overrides", {}))
    opts.update({k: v for k, v in (extra or {}).items() if v is not None})
    return build_config(None, opts)


# -- the test set --------------------------------------------------------------------------------------------
@dataclass
class TestSet:
    ids: torch.Tensor  # [N, L] teacher samples the distiller never saw
    prompts: torch.Tensor  # [P, p] prefixes for the entropy measurement
    seed: int
    sizes: dict
    teacher_entropy: dict

    def entropy(self, model) -> dict:
        from sparsekd_deploy.core import consistency

        s = self.sizes
        return consistency.measure(model, self.prompts, s["entropy_samples"], s["entropy_tokens"], 1.0, 4, seed=self.seed)

    def metrics(self, teacher, student, batch_size: int) -> dict:
        from sparsekd_deploy.core.evaluate import heldout_metrics

        student = student.to("cpu").eval()
        m = heldout_metrics(teacher, student, self.ids, batch_size, torch.device("cpu"))
        return {"test_kl": m["kl"], "test_top1": m["top1"], "entropy": self.entropy(student),
                "teacher_entropy": self.teacher_entropy}


def make_test_set(teacher, tokenizer, seed: int, sizes: dict) -> TestSet:
    from sparsekd_deploy.core import consistency
    from sparsekd_deploy.core.teacher import sample_teacher_data

    test_seed = seed + TEST_SEED_OFFSET
    ids = sample_teacher_data(teacher, tokenizer, sizes["test_samples"], sizes["seq_len"], test_seed)
    prompts = ids[: sizes["entropy_prompts"], : max(1, min(16, sizes["seq_len"] // 2))]
    ent = consistency.measure(teacher, prompts, sizes["entropy_samples"], sizes["entropy_tokens"], 1.0, 4, seed=test_seed)
    return TestSet(ids, prompts, test_seed, sizes, ent)


# -- one distillation set per (teacher, seed) ------------------------------------------------------------------
_DATA_MEMO: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def share_distillation_sets() -> None:
    """Sample each data-free distillation set once per (teacher, seed, sizes) instead of once per cell.

    Every cell of one (model, seed) distils on the same teacher samples (``build_data`` draws them with the
    config's seed, so they are identical anyway); sampling them took ~20 s of a ~25 s one-shot cell on the demo
    teacher (288 × 128 tokens, 1 thread). Memoises ``sparsekd_deploy.core.teacher.build_data``, which the distiller
    looks up on that module at call time; text data (``cfg.data``) is passed through untouched.
    """
    from sparsekd_deploy.core import teacher as teacher_mod

    if getattr(teacher_mod.build_data, "_bench_memo", False):
        return
    original = teacher_mod.build_data

    def build_data(cfg, teacher, tokenizer):
        if cfg.data is not None:
            return original(cfg, teacher, tokenizer)
        from sparsekd_deploy.models.loading import resolve_teacher

        key = (str(resolve_teacher(cfg.teacher).resolve()), cfg.seed, cfg.num_samples, cfg.heldout_samples, cfg.seq_len)
        if key not in _DATA_MEMO:
            _DATA_MEMO[key] = original(cfg, teacher, tokenizer)
        train, held = _DATA_MEMO[key]
        return train.clone(), held.clone()

    build_data._bench_memo = True
    teacher_mod.build_data = build_data


def prime_distillation_set(teacher_path: Path, teacher, tokenizer, seed: int, sizes: dict) -> None:
    """Sample the (model, seed) distillation set now, so it is timed once and not charged to the first cell."""
    from sparsekd_deploy.core import teacher as teacher_mod

    cfg = build_config(None, dict(teacher=str(teacher_path), seed=seed, num_samples=sizes["num_samples"],
                                  heldout_samples=sizes["heldout_samples"], seq_len=sizes["seq_len"]))
    teacher_mod.build_data(cfg, teacher, tokenizer)


# -- running one cell ----------------------------------------------------------------------------------------
def run_oneshot(cfg: DistillConfig, importance: str) -> tuple[torch.nn.Module, dict]:
    """Prune straight to the pattern with no training (``core.oneshot``, as bench_distill.py's baseline)."""
    from sparsekd_deploy.core.oneshot import one_shot
    from sparsekd_deploy.core.pruner import sparsity_report

    d = one_shot(cfg, importance)
    held = d.measure()
    summary = {"heldout_kl": held["kl"], "heldout_top1": held["top1"], "reached_target": True, "final_stage": 1,
               "sparsity": sparsity_report(d.pruner, d.raw)["overall_sparsity"], "steps": 0}
    return d.raw, summary


def run_trained(cfg: DistillConfig) -> tuple[torch.nn.Module, dict]:
    from sparsekd_deploy.core.distill import distill
    from sparsekd_deploy.models.loading import load_model

    res = distill(cfg, overwrite=True)
    student = load_model(res.out / "student", role="student")
    s = res.summary
    summary = {"heldout_kl": s["kl"], "heldout_top1": s["top1"], "reached_target": res.reached_target,
               "final_stage": s["final_stage"], "stages": s["stages"], "status": s["status"], "reason": s["reason"],
               "sparsity": s["sparsity"], "parameters": s.get("parameters"),
               "steps": sum(r.get("steps", 0) for r in res.trajectory),
               "step_budget": cfg.stages * cfg.steps_per_stage,
               "train_tokens_per_second": s.get("train_tokens_per_second"),
               "trajectory": [{k: r.get(k) for k in ("stage", "label", "sparsity", "kl_after_prune", "kl", "steps",
                                                     "best_step", "lr", "accepted", "lr_search", "mask_learning")}
                              for r in res.trajectory[1:]]}
    return student, summary


def clear_run(run: Path) -> None:
    for p in (run, run.with_name(run.name + ".partial")):
        shutil.rmtree(p, ignore_errors=True)


def run_cell(cell: Cell, teacher_path: Path, teacher, test: TestSet, root: Path, settings: dict,
             extra: dict | None = None) -> dict:
    """Run, measure on the test set, cache atomically, delete the run dir; returns the cell record."""
    from sparsekd_deploy.fsutil import write_json_atomic

    record = {"model": Path(cell.model).name, "pattern": cell.pattern, "method": cell.method, "seed": cell.seed,
              "label": METHODS[cell.method]["label"], "target_sparsity": pattern_sparsity(cell.pattern),
              "settings": cell_settings(cell, settings), "test_seed": test.seed}
    run = cell.run_dir(root)
    began = time.perf_counter()
    try:
        cfg = cell_config(cell, teacher_path, run, settings.get("steps", 0), settings, settings["kl_budget"], extra)
    except ConfigError as e:
        record.update(status="unsupported", reason=str(e), seconds=0.0)
    else:
        clear_run(run)
        try:
            m = METHODS[cell.method]
            if m["kind"] == "oneshot":
                student, summary = run_oneshot(cfg, m["importance"])
            else:
                student, summary = run_trained(cfg)
            record.update(status="ok", distiller=summary, **test.metrics(teacher, student, cfg.batch_size))
            del student
        except Exception as e:  # noqa: BLE001 - one broken cell must not stop the matrix
            record.update(status="error", reason=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc(limit=6))
        finally:
            clear_run(run)
        record["seconds"] = round(time.perf_counter() - began, 2)
    path = cell.path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return record


def load_cached(cell: Cell, root: Path, settings: dict | None) -> dict | None:
    """The cell's record when it finished with these settings (``settings`` None: any finished record)."""
    try:
        rec = json.loads(cell.path(root).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("status") != "ok" or (settings is not None and rec.get("settings") != cell_settings(cell, settings)):
        return None
    return rec


# -- time estimate -------------------------------------------------------------------------------------------
def estimate(cell: Cell, times: dict[tuple, list[float]]) -> float | None:
    kind = METHODS[cell.method]["kind"]
    for key in ((cell.model, cell.pattern, cell.method), (cell.model, cell.method), (cell.model, kind), (kind,)):
        if times.get(key):
            return statistics.mean(times[key])
    return None


def note_time(cell: Cell, seconds: float, times: dict[tuple, list[float]]) -> None:
    kind = METHODS[cell.method]["kind"]
    for key in ((cell.model, cell.pattern, cell.method), (cell.model, cell.method), (cell.model, kind), (kind,)):
        times.setdefault(key, []).append(seconds)


def fmt_min(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# -- the report ----------------------------------------------------------------------------------------------
def aggregate(records: list[dict], seeds: list[int]) -> dict:
    """{model: {pattern: {method: row}}} over the finished cells."""
    by: dict = {}
    for r in records:
        by.setdefault(r["model"], {}).setdefault(r["pattern"], {}).setdefault(r["method"], {})[r["seed"]] = r
    out: dict = {}
    for model, pats in by.items():
        for pattern, meths in pats.items():
            ref = meths.get(REF, {})
            ref_mean = statistics.mean(c["test_kl"] for c in ref.values()) if ref else None
            for method, cells in meths.items():
                kls = {s: cells[s]["test_kl"] for s in seeds if s in cells}
                if not kls:
                    continue
                mean = statistics.mean(kls.values())
                paired = [kls[s] - ref[s]["test_kl"] for s in kls if s in ref]
                ratios = [kls[s] / ref[s]["test_kl"] for s in kls if s in ref and ref[s]["test_kl"] > 0]
                row = {
                    "label": METHODS.get(method, {}).get("label", method), "kl": kls, "kl_mean": mean,
                    "kl_min": min(kls.values()), "kl_max": max(kls.values()),
                    "ratio_vs_ref": mean / ref_mean if ref_mean else None,
                    # the README's ratios: the mean of the per-seed ratios (each seed against its own baseline run)
                    "paired_ratio": statistics.mean(ratios) if ratios and method != REF else None,
                    "paired_delta": statistics.mean(paired) if paired and method != REF else None,
                    "paired_wins": sum(d < 0 for d in paired), "paired_n": len(paired),
                    "top1": statistics.mean(cells[s]["test_top1"] for s in kls),
                    "entropy": statistics.mean(cells[s]["entropy"]["mean_entropy"] for s in kls),
                    "teacher_entropy": statistics.mean(cells[s]["teacher_entropy"]["mean_entropy"] for s in kls),
                    "heldout_kl": statistics.mean(cells[s]["distiller"]["heldout_kl"] for s in kls),
                    "sparsity": statistics.mean(cells[s]["distiller"]["sparsity"] for s in kls),
                    "target_sparsity": next(iter(cells.values()))["target_sparsity"],
                    "reached": sum(bool(cells[s]["distiller"]["reached_target"]) for s in kls),
                    "seconds": statistics.mean(cells[s]["seconds"] for s in kls), "n": len(kls),
                }
                out.setdefault(model, {}).setdefault(pattern, {})[method] = row
    return out


def sort_patterns(patterns) -> list[str]:
    order = {"nm": 0, "unstructured": 1, "channels": 2}
    return sorted(patterns, key=lambda p: (order[pattern_kind(p)], pattern_sparsity(p)))


def sort_methods(methods) -> list[str]:
    known = list(METHODS)
    return sorted(methods, key=lambda m: known.index(m) if m in known else len(known))


def winner_sentence(model: str, pattern: str, rows: dict, seeds: list[int]) -> str:
    full = {m: r for m, r in rows.items() if r["n"] == len(seeds)} or rows
    ranked = sorted(full, key=lambda m: full[m]["kl_mean"])
    best = full[ranked[0]]
    partial = "" if len(full) == len(rows) and best["n"] == len(seeds) else " (incomplete seeds)"
    text = f"**{pattern}** ({model}): {best['label']} wins with mean test KL {best['kl_mean']:.4g}{partial}"
    if len(ranked) > 1:
        second = full[ranked[1]]
        text += f"; runner-up {second['label']} {second['kl_mean']:.4g} ({second['kl_mean'] / best['kl_mean']:.2f} ×)"
    if ranked[0] != REF and REF in rows and best.get("ratio_vs_ref") is not None:
        text += (f"; {best['ratio_vs_ref']:.2f} × one-shot Wanda + KD, paired Δ {best['paired_delta']:+.4g}, lower on "
                 f"{best['paired_wins']}/{best['paired_n']} seeds")
    return text + "."


def markdown(agg: dict, seeds: list[int], steps: int, note: str) -> str:
    lines = [f"# Benchmark matrix — test KL(teacher‖student), {steps} optimizer steps per trained method", "", note, ""]
    for model in agg:
        lines += [f"## {model}", ""]
        head = (["pattern", "method"] + [f"seed {s}" for s in seeds]
                + ["mean", "× 1-shot+KD", "paired ×", "paired Δ (lower/n)", "top-1", "H student / teacher", "sparsity",
                   "held-out KL", "s/cell"])
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        sentences = []
        for pattern in sort_patterns(agg[model]):
            rows = agg[model][pattern]
            for method in sort_methods(rows):
                r = rows[method]
                mark = "" if r["reached"] == r["n"] else f" ({r['reached']}/{r['n']} reached)"
                cells = [pattern, r["label"] + mark] + [f"{r['kl'][s]:.4f}" if s in r["kl"] else "–" for s in seeds]
                cells += [f"{r['kl_mean']:.4f}",
                          f"{r['ratio_vs_ref']:.3f}" if r["ratio_vs_ref"] is not None else "–",
                          f"{r['paired_ratio']:.3f}" if r.get("paired_ratio") is not None else "–",
                          f"{r['paired_delta']:+.4f} ({r['paired_wins']}/{r['paired_n']})"
                          if r["paired_delta"] is not None else "–",
                          f"{r['top1']:.3f}", f"{r['entropy']:.3f} / {r['teacher_entropy']:.3f}",
                          f"{r['sparsity']:.3f}", f"{r['heldout_kl']:.4f}", f"{r['seconds']:.0f}"]
                lines.append("| " + " | ".join(cells) + " |")
            sentences.append(winner_sentence(model, pattern, rows, seeds))
        lines += [""] + [f"- {s}" for s in sentences] + [""]
    return "\n".join(lines)


def plot(agg: dict, model: str, path: Path, steps: int, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = sort_methods({m for rows in agg[model].values() for m in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {"unstructured": "o", "nm": "s", "channels": "^"}
    for i, method in enumerate(methods):
        color = colors[i % len(colors)]
        dx = (i - (len(methods) - 1) / 2) * 0.006  # so error bars at one sparsity do not hide each other
        label = METHODS.get(method, {}).get("label", method)
        for kind in ("unstructured", "nm", "channels"):
            pts = sorted(((r["target_sparsity"], r) for p, rows in agg[model].items() for m, r in rows.items()
                          if m == method and pattern_kind(p) == kind), key=lambda t: t[0])
            if not pts:
                continue
            y = [r["kl_mean"] for _, r in pts]
            err = [[r["kl_mean"] - r["kl_min"] for _, r in pts], [r["kl_max"] - r["kl_mean"] for _, r in pts]]
            ax.errorbar([s + dx for s, _ in pts], y, yerr=err, color=color, marker=markers[kind], capsize=3, ms=6,
                        linestyle="-" if kind == "unstructured" else "none", label=label)
            label = None  # one legend entry per method
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (target)")
    ax.set_ylabel("test KL(teacher‖student), nats/token")
    ax.set_title(f"{model}: test KL vs sparsity ({steps} steps, seeds {', '.join(map(str, seeds))}; bars = min/max)")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    kinds = {pattern_kind(p) for p in agg[model]}
    for kind, text in (("unstructured", "unstructured"), ("nm", "2:4 (n:m)"), ("channels", "channels")):
        if kind in kinds:
            handles.append(Line2D([], [], color="gray", marker=markers[kind], linestyle="none"))
            labels.append(text)
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(records: list[dict], root: Path, seeds: list[int], steps: int, note: str) -> str:
    from sparsekd_deploy.fsutil import write_json_atomic

    agg = aggregate(records, seeds)
    text = markdown(agg, seeds, steps, note)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(text)
    write_json_atomic(root / "results.json", {"steps": steps, "seeds": seeds, "rows": agg, "cells": records})
    for model in agg:
        plot(agg, model, root / f"kl_vs_sparsity_{model}.png", steps, seeds)
    return text


# -- main ------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "wide"], help="demo, wide, or model dirs")
    ap.add_argument("--patterns", nargs="+", help="default: each model's set (see MODELS)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: each model's set")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=90,
                    help="optimizer steps of every trained method (default 90: the full matrix, 96 cells, took an "
                         "estimated ~55 min on the shared 2-core machine at --threads 1)")
    ap.add_argument("--kl-budget", type=float, default=1000.0,
                    help="per-stage KL budget of the trained runs; default: none that binds, so every run reaches "
                         "the target at the same step count")
    ap.add_argument("--lr", type=float, help="override the config's lr (default: the config's)")
    ap.add_argument("--batch-size", type=int, help="override the config's batch size (default: the config's)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave it)")
    ap.add_argument("--out", type=Path, help="cache and results dir (default runs/bench_matrix, "
                                             "runs/bench_matrix_quick with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 4 steps, seed 0, demo, unstructured:0.8, tiny data and measurement sizes")
    ap.add_argument("--list", action="store_true", help="print the cells and whether each is cached, then exit")
    ap.add_argument("--report-only", action="store_true", help="tables and plots from the cached cells only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    share_distillation_sets()
    sizes = SIZES["quick" if args.quick else "full"]
    if args.quick:
        args.steps = 4 if args.steps == ap.get_default("steps") else args.steps
        args.seeds = [0] if args.seeds == ap.get_default("seeds") else args.seeds
        args.models = ["demo"] if args.models == ap.get_default("models") else args.models
        args.patterns = args.patterns or ["unstructured:0.8"]
    root = args.out or ROOT / "runs" / ("bench_matrix_quick" if args.quick else "bench_matrix")
    settings = settings_of(args, sizes)
    extra = {"lr": args.lr, "batch_size": args.batch_size}
    cells = plan_cells(args.models, args.patterns, args.methods, args.seeds)
    cached = {c: load_cached(c, root, settings) for c in cells}
    todo = [c for c in cells if cached[c] is None]
    stages = STAGED_STAGES
    print(f"{len(cells)} cells ({len(cells) - len(todo)} cached, {len(todo)} to run) in {root}; trained methods: "
          f"{args.steps} optimizer steps (one-shot + KD 1 × {args.steps}, staged {stages} × {args.steps // stages})",
          flush=True)
    if args.list:
        for c in cells:
            print(f"  {'cached ' if cached[c] else 'to run '} {c.name()}")
        return 0

    times: dict[tuple, list[float]] = {}
    for c, rec in cached.items():
        if rec:
            note_time(c, rec["seconds"], times)
    began = time.perf_counter()
    failed = []
    if not args.report_only:
        from sparsekd_deploy.models.loading import load_model, load_tokenizer

        current: tuple | None = None
        teacher = test = teacher_path = None
        for i, cell in enumerate(todo, 1):
            if current != (cell.model, cell.seed):
                t0 = time.perf_counter()
                if current is None or current[0] != cell.model:
                    teacher_path = teacher_dir(cell.model)
                    teacher = load_model(teacher_path, role="teacher")
                    tokenizer = load_tokenizer(teacher_path, required=False)
                test = make_test_set(teacher, tokenizer, cell.seed, sizes)
                current = (cell.model, cell.seed)
                prime_distillation_set(teacher_path, teacher, tokenizer, cell.seed, sizes)
                print(f"{cell.model} seed {cell.seed}: distillation set sampled; test set {tuple(test.ids.shape)} "
                      f"teacher samples (seed {test.seed}), teacher entropy {test.teacher_entropy['mean_entropy']:.3f} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
            rec = run_cell(cell, teacher_path, teacher, test, root, settings, extra)
            cached[cell] = rec if rec["status"] == "ok" else None
            if rec["status"] == "ok":
                note_time(cell, rec["seconds"], times)
                d = rec["distiller"]
                what = (f"test KL {rec['test_kl']:.4f} top-1 {rec['test_top1']:.3f} H {rec['entropy']['mean_entropy']:.3f}"
                        f"/{rec['teacher_entropy']['mean_entropy']:.3f} | held-out KL {d['heldout_kl']:.4f} "
                        f"sparsity {d['sparsity']:.3f}" + ("" if d["reached_target"] else
                                                            f" STOPPED at stage {d['final_stage']}"))
            else:
                failed.append(rec)
                what = f"{rec['status'].upper()}: {rec['reason'][:300]}"
            rest = [estimate(c, times) for c in todo[i:]]
            known = [r for r in rest if r is not None]
            guess = sum(known) + (len(rest) - len(known)) * (statistics.mean(known) if known else 0)
            print(f"[{i}/{len(todo)}] {cell.name()}: {what} ({rec['seconds']:.1f} s; elapsed "
                  f"{fmt_min(time.perf_counter() - began)}; est. rest {fmt_min(guess)}"
                  + ("" if len(known) == len(rest) else ", rough: some cell kinds not timed yet") + ")", flush=True)

    records = [r for r in cached.values() if r]
    if not records:
        print("no finished cells to report", flush=True)
        return 1 if failed else 0
    note = (f"Test set: per (model, seed) {sizes['test_samples']} × {sizes['seq_len']} tokens sampled from the teacher "
            f"(seed + {TEST_SEED_OFFSET}), never seen by the distiller, which selects each stage's best state on its "
            f"own held-out set (held-out KL column). Entropy: mean sampling entropy at τ = 1 "
            f"({sizes['entropy_prompts']} test prefixes × {sizes['entropy_samples']} samples × "
            f"{sizes['entropy_tokens']} tokens). Trained methods: retries 0, KL budget {args.kl_budget:g}, "
            f"data-free distillation on {sizes['num_samples']} teacher samples. × 1-shot+KD: ratio of means; paired ×: mean of the "
            f"per-seed ratios (the README's); paired Δ: "
            f"mean per-seed difference to one-shot Wanda + KD (lower/n: seeds where the method is lower).")
    text = report(records, root, args.seeds, args.steps, note)
    print("\n" + text, flush=True)
    print(f"wrote {root / 'results.md'}, {root / 'results.json'} and the plots", flush=True)
    for rec in failed:
        print(f"not finished: {rec['model']} {rec['pattern']} {rec['method']} seed{rec['seed']}: {rec['status']} "
              f"({rec['reason'][:200]})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
