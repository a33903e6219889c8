"""Typed run configuration. YAML recipes load into it; CLI flags override the recipe; every problem is
reported at once (not one per try)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .models.adapters import DEFAULT_EXCLUDE

DISTILL_QAT_TARGET = "onnxruntime"  # what a distill on its own simulates when its recipe names no qat_target


@dataclass
class DistillConfig:
    teacher: str | None = None  # local HF dir, cached Hub id, or None/"demo" for the built-in demo teacher
    tokenizer: str | None = None  # dir of the teacher's tokenizer; None = the one saved in the teacher dir
    out: str | None = None
    pattern: str = "2:4"
    # None = the pattern's default (default_stages): one stage where staging measurably does not pay (n:m, and
    # targets removing at most half the weights), STAGES_CONTINUOUS for heavier removal.
    stages: int | None = None
    kl_budget: float = 0.15
    # None = DEFAULT_STEP_BUDGET / stages, so the default budget is the same whatever the stage count.
    steps_per_stage: int | None = None  # average: the run's budget is stages × steps_per_stage
    step_schedule: str = "backloaded"  # equal | backloaded (stage k gets a share ∝ k)
    # cubic (most of the pruning in the early stages) beat linear on each of 3 seeds: mean held-out KL 0.0164 vs
    # 0.0184 on the demo at 300 steps (scripts/bench_staged_vs_oneshot.py).
    sparsity_schedule: str = "cubic"  # cubic | linear
    retries: int = 2
    # None = the pattern's default: fisher for channels:S / channels:auto (scores what a channel's output does to the
    # predictions; README, channel results), wanda for weight patterns (fisher scores channels only).
    importance: str | None = None
    operator: str = "power:1"
    loss: str = "forward-kl"
    # logits: teacher distributions (teacher in memory); text: teacher samples as targets (black box); topk:K: the
    # teacher's top-K log-probs + tail mass written once to an on-disk cache, then training runs without the teacher
    teacher_access: str = "logits"
    teacher_cache: str | None = None  # topk:K: cache dir, kept and reused (stamp-checked); None = inside the run, removed at its end
    # KD loss over the vocabulary in chunks of this many tokens (full [tokens × vocab] logits never exist at once);
    # 0 = off, None = automatic: chunk when one float32 copy of a batch's logits would pass 256 MiB (losses.kd_chunk_tokens)
    kd_chunk: int | None = None
    data: str | None = None  # text file or dir of *.txt; None = data-free (sample the teacher)
    seq_len: int = 128
    num_samples: int = 256  # data-free: teacher samples to distill on
    heldout_samples: int = 32
    batch_size: int = 8
    lr: float = 5e-4
    # on: a short range test on the first stage's pruned student chooses the run's lr, starting from `lr`
    # (core/lr_search.py); auto: on when the run's step budget is ≥ 60 (below, the trials would cost half the run)
    lr_search: str = "auto"  # auto | on | off
    seed: int = 0
    # Batches of training sequences importance is scored on; None = 4, or FISHER_CALIB_SEQUENCES' worth under
    # importance fisher (its channel ranking kept improving up to the demo's whole 256-sequence training set).
    calib_batches: int | None = None
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    sparsify_only_faster: str | None = None  # profile.json: keep dense the layers where 2:4 does not pay
    # Per-layer sparsity by load path (unstructured): less where single-layer pruning costs the most KL.
    # None = the pattern's default: loadpath for unstructured:S (it beat uniform on every seed at 0.5/0.8/0.9 on the
    # demo, README), uniform for n:m, channels and auto patterns (they cannot take per-layer sparsities).
    allocation: str | None = None  # uniform | loadpath
    # sr-ste: the first mask_learning_share of each stage's steps choose its masks through the KD loss (dense latents,
    # straight-through gradients, re-ranked every step; core/mask_learning.py); off: the criterion's one-shot choice.
    mask_learning: str = "off"  # off | sr-ste
    mask_learning_share: float | None = None  # None = OPENING_SHARE when mask_learning is on (else unused: refused)
    # gradual: what a stage's prune removes fades out (×1 → ×0, frozen) over its first demolition_share of steps while
    # the KD loss trains the rest, then recovery under the masks (core/demolition.py); off: removed at once.
    demolition: str = "off"  # off | gradual
    # ls: after a channel prune, refit each MLP's output projection on the kept channels so the block's output on the
    # calibration tokens stays as close as a ridge least-squares fit can make it (core/compensation.py).
    # None = ls for channel patterns (README, channel results), off otherwise (it applies to channel prunes only).
    compensation: str | None = None  # off | ls
    demolition_share: float | None = None  # None = OPENING_SHARE when demolition is gradual (else unused: refused)
    dense_layers: str | None = None  # n:m: keep the K most load-bearing layers dense ("3"), or "auto"
    loadpaths: str | None = None  # a loadpaths.json from `analyze`; None = analysed in the run, on its training data
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast on GPU; CPU runs fp32)
    # The teacher's weights while the student trains (core/teacher_precision.py): auto = the run's 16-bit autocast
    # type on a GPU (its matmuls run in it anyway; half the memory), fp32 on a CPU.
    teacher_precision: str = "auto"  # auto | fp32 | bf16 | fp16
    # Launched runs (torchrun / accelerate launch) use DDP; fsdp shards the student over the ranks instead (FSDP2,
    # core/fsdp.py; what it refuses: distributed.fsdp_problems).
    fsdp: bool = False
    consistency_prompts: int = 8
    consistency_samples: int = 8
    consistency_tokens: int = 16
    consistency_m: int = 4
    consistency_temperatures: list[float] = field(default_factory=lambda: [1.0])
    # Export-side (build / export): a quantized copy of the graph beside model.onnx, made by onnxruntime.quantization.
    quantize: str = "none"  # none | int8-dynamic | int8 | int4-weight | fp8 (exporters/quantize.py says why per mode)
    calibration: str = "minmax"  # int8: minmax | entropy | percentile (fp8 always amax: max |x|)
    calibration_samples: int = 32  # training sequences (never held-out) that calibrate static activations
    # A last distillation stage of this many steps with the student's Linear layers fake-quantized as `quantize` will
    # quantize them (core/qat.py); 0 = none. It changes the student, so unlike the three above it is a distill setting.
    qat_steps: int = 0
    # The runtime whose quantized graph the QAT stage simulates (onnxruntime | tensorrt: their int8 activations
    # differ, uint8 asymmetric vs int8 symmetric; fp8 is tensorrt's only). build sets it to its --target; a distill
    # on its own simulates onnxruntime (DISTILL_QAT_TARGET) unless its recipe says otherwise. None until one of them
    # settles it (settle_qat_target): a config made for the library's build does not know its target yet.
    qat_target: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def _problems(cfg: DistillConfig) -> list[str]:
    """Every range/choice problem; spec strings are checked by building them."""
    from .core.importance import IMPORTANCE
    from .core.losses import make_loss
    from .core.operators import make_operator
    from .core.patterns import make_pattern

    p = []
    if cfg.stages < 1:
        p.append(f"stages must be ≥ 1, got {cfg.stages}")
    if not (cfg.kl_budget > 0 and math.isfinite(cfg.kl_budget)):
        p.append(f"kl_budget must be a finite number > 0, got {cfg.kl_budget}")
    for name in ("steps_per_stage", "seq_len", "num_samples", "heldout_samples", "batch_size", "calib_batches",
                 "consistency_prompts", "consistency_samples", "consistency_tokens", "consistency_m"):
        if getattr(cfg, name) < 1:
            p.append(f"{name} must be ≥ 1, got {getattr(cfg, name)}")
    # torch takes seeds in [-2**63, 2**64) (beyond: a ValueError mid-run); the run adds per-stage offsets (< 2**20).
    if not -(2**63) <= cfg.seed < 2**64 - 2**20:
        p.append(f"seed must be a whole number from -2**63 to below 2**64 - 2**20, got {cfg.seed}")
    if cfg.retries < 0:
        p.append(f"retries must be ≥ 0, got {cfg.retries}")
    if cfg.seq_len < 2:
        p.append(f"seq_len must be ≥ 2, got {cfg.seq_len}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        p.append(f"lr must be > 0, got {cfg.lr}")
    if cfg.sparsity_schedule not in ("linear", "cubic"):
        p.append(f"sparsity_schedule must be linear or cubic, got {cfg.sparsity_schedule!r}")
    if cfg.lr_search not in ("auto", "on", "off"):
        p.append(f"lr_search must be auto, on or off, got {cfg.lr_search!r}")
    if cfg.mask_learning not in ("off", "sr-ste"):
        p.append(f"mask_learning must be off or sr-ste, got {cfg.mask_learning!r}")
    p.extend(_share_problems("mask_learning_share", cfg.mask_learning_share, cfg.mask_learning != "off",
                             "mask_learning sr-ste"))
    if cfg.compensation not in ("off", "ls"):
        p.append(f"compensation must be off or ls, got {cfg.compensation!r}")
    elif cfg.compensation == "ls" and not str(cfg.pattern).strip().startswith("channels"):
        p.append(f"compensation ls refits MLP output projections after a channel prune: use it with channels:S, "
                 f"not {cfg.pattern!r}")
    if cfg.demolition not in ("off", "gradual"):
        p.append(f"demolition must be off or gradual, got {cfg.demolition!r}")
    p.extend(_share_problems("demolition_share", cfg.demolition_share, cfg.demolition != "off",
                             "demolition gradual"))
    if cfg.demolition == "gradual" and cfg.compensation == "ls":
        p.append("demolition gradual fades the removed channels out while compensation ls has the kept ones carry "
                 "their load already: choose one")
    if cfg.demolition == "gradual" and cfg.mask_learning != "off":
        p.append("demolition gradual and mask_learning both use the first part of each stage: choose one")
    # Mask learning restarts from the weights before the prune and re-ranks by |W|·‖x‖ every step: it would undo a
    # refit and replace the Fisher ranking on its first step while the record still named them.
    if cfg.mask_learning != "off" and cfg.compensation == "ls":
        p.append("mask_learning sr-ste restarts from the weights before the prune, which undoes compensation ls's "
                 "refit: choose one (--compensation off)")
    if cfg.mask_learning != "off" and cfg.importance == "fisher":
        p.append("mask_learning sr-ste re-ranks the masks by |W|·‖x‖ every step, which replaces importance fisher's "
                 "ranking: choose one (--importance wanda)")
    if cfg.step_schedule not in ("equal", "backloaded"):
        p.append(f"step_schedule must be equal or backloaded, got {cfg.step_schedule!r}")
    p.extend(_teacher_access_problems(cfg))
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        p.append(f"precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.teacher_precision not in ("auto", "fp32", "bf16", "fp16"):
        p.append(f"teacher_precision must be auto, fp32, bf16 or fp16, got {cfg.teacher_precision!r}")
    elif cfg.teacher_precision != "auto" and topk_access(cfg.teacher_access) is not None:
        p.append(f"teacher_precision {cfg.teacher_precision}: with teacher_access {cfg.teacher_access} the teacher "
                 "is freed once it wrote its top-K cache, before training; drop --teacher-precision")
    if cfg.fsdp:
        from .core.distributed import fsdp_problems

        p.extend(fsdp_problems(cfg))
    p.extend(_quantize_problems(cfg))
    if not cfg.consistency_temperatures or not all(t > 0 and math.isfinite(t) for t in cfg.consistency_temperatures):
        p.append("consistency_temperatures must be a non-empty list of finite numbers > 0")
    if cfg.importance not in IMPORTANCE:
        p.append(f"unknown importance {cfg.importance!r}; available: {', '.join(IMPORTANCE.names())}")
    elif cfg.importance == "fisher" and not str(cfg.pattern).strip().startswith("channels"):
        p.append(f"importance fisher scores whole MLP channels: use it with channels:S, not {cfg.pattern!r}")
    from .core.patterns import NM, is_auto

    p.extend(_auto_problems(cfg) if is_auto(cfg.pattern) else [])
    pattern_spec = cfg.pattern.replace(":auto", ":0.5") if is_auto(cfg.pattern) else cfg.pattern
    for label, build, spec in (("pattern", make_pattern, pattern_spec), ("operator", make_operator, cfg.operator),
                               ("loss", make_loss, cfg.loss)):
        try:
            build(spec)
        except ValueError as e:  # ConfigError / UnknownNameError are ValueErrors
            p.append(f"{label}: {e}")
    if cfg.sparsify_only_faster is not None and not Path(cfg.sparsify_only_faster).is_file():
        p.append(f"sparsify_only_faster: profile {cfg.sparsify_only_faster!r} does not exist")
    if cfg.data is not None and not Path(cfg.data).exists():
        p.append(f"data {cfg.data!r} does not exist")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).expanduser().is_dir():
        state = "is not a directory" if Path(cfg.tokenizer).expanduser().exists() else "does not exist"
        p.append(f"tokenizer dir {cfg.tokenizer!r} {state}")
    if cfg.out is not None and Path(cfg.out).name in ("", ".", ".."):
        p.append(f"out {cfg.out!r} names a directory by a relative step; name the run dir, e.g. runs/my-run")
    p.extend(_load_path_problems(cfg, NM))
    return p


def topk_access(spec: str) -> int | None:
    """K of a ``topk:K`` teacher access; None for another access (or a malformed one, reported by _problems)."""
    m = re.fullmatch(r"\s*topk\s*:\s*(\d+)\s*", str(spec))
    return int(m.group(1)) if m else None


def _teacher_access_problems(cfg: DistillConfig) -> list[str]:
    k = topk_access(cfg.teacher_access)
    if cfg.teacher_access not in ("logits", "text") and (k is None or k < 1):
        return [f"teacher_access must be logits, text or topk:K with K ≥ 1, got {cfg.teacher_access!r}"]
    p = []
    if cfg.kd_chunk is not None and cfg.kd_chunk < 0:
        p.append(f"kd_chunk must be ≥ 0 tokens (0 = off), got {cfg.kd_chunk}")
    if k is None:
        if cfg.teacher_cache is not None:
            p.append("teacher_cache is the cache of --teacher-access topk:K; the run uses "
                     f"{cfg.teacher_access}")
        return p
    op = re.fullmatch(r"\s*topk\s*:\s*(\d+)\s*", str(cfg.operator))
    if op is None or int(op.group(1)) > k:
        p.append(f"teacher_access topk:{k} trains on the teacher's top-{k} buckets, so the operator must be topk:K' "
                 f"with K' ≤ {k} (got {cfg.operator}); pass --operator topk:{k} or --teacher-access logits")
    if cfg.teacher_cache is not None and Path(cfg.teacher_cache).exists() and not Path(cfg.teacher_cache).is_dir():
        p.append(f"teacher_cache {cfg.teacher_cache!r} is a file; name a directory")
    return p


def _quantize_problems(cfg: DistillConfig) -> list[str]:
    from .precisions import CALIBRATION_METHODS, MIN_CALIBRATION, MODES, STATIC

    p = []
    if cfg.quantize not in MODES:
        p.append(f"quantize must be one of {', '.join(MODES)}, got {cfg.quantize!r}")
    if cfg.calibration not in CALIBRATION_METHODS:
        p.append(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {cfg.calibration!r}")
    if cfg.calibration_samples < MIN_CALIBRATION:
        p.append(f"calibration_samples must be ≥ {MIN_CALIBRATION} (fewer sequences do not calibrate activation "
                 f"ranges), got {cfg.calibration_samples}")
    elif cfg.quantize in STATIC and cfg.data is None and cfg.calibration_samples > cfg.num_samples:
        p.append(f"quantize {cfg.quantize} calibrates on {cfg.calibration_samples} training sequences but the run "
                 f"samples only num_samples {cfg.num_samples}: lower calibration_samples or raise num_samples")
    p.extend(_qat_problems(cfg))
    return p


def _qat_problems(cfg: DistillConfig) -> list[str]:
    from .core.patterns import is_auto
    from .core.qat import QAT_MODES, TARGETS
    from .precisions import MODES as MODES_WITH_NONE

    if cfg.qat_steps < 0:
        return [f"qat_steps must be ≥ 0 (0 = no quantization-aware stage), got {cfg.qat_steps}"]
    if cfg.qat_target is not None and cfg.qat_target not in TARGETS:
        return [f"qat_target must be {' or '.join(TARGETS)} (the runtime whose quantized graph QAT simulates), "
                f"got {cfg.qat_target!r}"]
    if not cfg.qat_steps or cfg.quantize not in MODES_WITH_NONE:
        return []
    if cfg.quantize == "none":
        return [f"qat_steps {cfg.qat_steps} trains the student against a quantization's rounding and quantize is none: "
                f"add --quantize ({', '.join(QAT_MODES)}), or drop --qat-steps"]
    if problem := _qat_target_problem(cfg):  # a target left open is checked once it is settled (settle_qat_target)
        return [problem]
    if is_auto(cfg.pattern):
        return [f"qat_steps needs a fixed pattern; {cfg.pattern!r} searches its sparsity (run the search, then "
                "build its result's pattern with --qat-steps)"]
    return []


def _qat_target_problem(cfg: DistillConfig) -> str | None:
    """Why a QAT stage cannot simulate ``cfg.qat_target``'s graph of its mode (None when it can, when there is no
    stage, or while the target is open): fp8 is tensorrt's only, int8-dynamic onnxruntime's."""
    from .core.qat import QAT_TARGETS

    if cfg.qat_target is None or not cfg.qat_steps or cfg.quantize not in QAT_TARGETS:
        return None
    if cfg.qat_target in QAT_TARGETS[cfg.quantize]:
        return None
    runs = " or ".join(QAT_TARGETS[cfg.quantize])
    return (f"qat_steps with quantize {cfg.quantize} simulates the {runs} graph and qat_target is {cfg.qat_target}: "
            f"build with --target {runs} (distill: qat_target: {runs} in the recipe)")


def settle_qat_target(cfg: DistillConfig, target: str | None = None) -> None:
    """Decide ``cfg.qat_target`` (in place) where the config left it open, and refuse (ConfigError) a QAT stage its
    runtime has no graph for. ``target``: a build's own runtime, which its QAT stage simulates whatever the config
    says; without one (a distill on its own) an open target is DISTILL_QAT_TARGET. ``build_config`` cannot decide:
    a library config is made before the build that says which target it is for."""
    from .core.qat import TARGETS

    if target in TARGETS:
        cfg.qat_target = target
    elif cfg.qat_target is None:
        cfg.qat_target = DISTILL_QAT_TARGET
    if problem := _qat_target_problem(cfg):
        raise ConfigError([problem])


def _auto_problems(cfg: DistillConfig) -> list[str]:
    kind = cfg.pattern.split(":")[0]
    if kind not in ("unstructured", "channels"):
        return [f"pattern {cfg.pattern!r}: auto searches a continuous sparsity, which only unstructured:auto and "
                "channels:auto have (an n:m pattern is one fixed sparsity)"]
    return []


def _load_path_problems(cfg: DistillConfig, NM) -> list[str]:
    from .core.patterns import is_auto, make_pattern

    p = []
    if cfg.allocation not in ("uniform", "loadpath"):
        p.append(f"allocation must be uniform or loadpath, got {cfg.allocation!r}")
    try:
        pattern = None if is_auto(cfg.pattern) else make_pattern(cfg.pattern)
    except ValueError:
        return p  # reported above
    kind = cfg.pattern.split(":")[0]
    if is_auto(cfg.pattern) and (cfg.allocation != "uniform" or cfg.dense_layers is not None):
        p.append(f"pattern {cfg.pattern} searches one global sparsity; it takes no allocation or dense_layers")
        return p
    if cfg.allocation == "loadpath" and (isinstance(pattern, NM) or kind == "channels"):
        p.append(f"allocation loadpath sets a sparsity per layer, which {cfg.pattern} cannot take ("
                 + ("use dense_layers K|auto to keep the most load-bearing layers dense" if isinstance(pattern, NM)
                    else "every MLP must keep the same channel count to shrink into a standard model") + ")")
    if cfg.dense_layers is not None:
        if not isinstance(pattern, NM):
            p.append(f"dense_layers is for n:m patterns (kept dense, the rest n:m); {cfg.pattern} takes allocation "
                     "loadpath instead")
        elif cfg.dense_layers != "auto" and not (cfg.dense_layers.isdigit()):
            p.append(f"dense_layers takes a count ≥ 0 or auto, got {cfg.dense_layers!r}")
    if cfg.loadpaths is not None and not Path(cfg.loadpaths).exists():
        p.append(f"loadpaths {cfg.loadpaths!r} does not exist (make it with `sparsekd-deploy analyze`)")
    return p


def _default(name: str) -> Any:
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


HINTS = typing.get_type_hints(DistillConfig)  # the field annotations as types: they drive the type check
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # YAML 1.1 reads `1e-4` as text
WORDS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
PLURALS = {int: "integers", float: "numbers", str: "text"}


def _optional(hint) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _scalar(kind: type, value: Any) -> tuple[Any, bool]:
    """(value as ``kind``, ok). Booleans are never numbers; numbers are never text; ``1e-4`` text is a number."""
    if kind is float:
        if isinstance(value, str) and NUMBER.match(value.strip()):
            return float(value), True
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value), True) if ok else (value, False)
    if kind is int:
        return value, isinstance(value, int) and not isinstance(value, bool)
    if kind is str and isinstance(value, os.PathLike):
        return os.fspath(value), True
    return value, isinstance(value, kind)


def _coerce(name: str, value: Any, problems: list[str]) -> Any:
    """Check one value against its field's annotation (YAML gives ints, floats, strings, lists, None); on a
    problem, record it and return the default so the other checks still run on a well-typed config."""
    kind, nullable = _optional(HINTS[name])
    if value is None:
        if nullable:
            return None
        expected = f"a list of {PLURALS[typing.get_args(kind)[0]]}" if typing.get_origin(kind) is list else WORDS[kind]
        problems.append(f"{name}: expected {expected}, got nothing (null)")
        return _default(name)
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        items = list(value) if isinstance(value, (list, tuple)) else [value]  # a single value is a list of one
        checked = [_scalar(item, v) for v in items]
        bad = [v for v, ok in checked if not ok]
        if bad:
            problems.append(f"{name}: expected a list of {PLURALS[item]}, got {value!r}")
            return _default(name)
        return [v for v, _ in checked]
    checked, ok = _scalar(kind, value)
    if not ok:
        hint = " (quote it in the recipe to make it text)" if kind is str and isinstance(value, (int, float)) else ""
        problems.append(f"{name}: expected {WORDS[kind]}{' or nothing' if nullable else ''}, got {value!r}{hint}")
        return _default(name)
    return checked


def _share_problems(name: str, share: float | None, used: bool, feature: str) -> list[str]:
    """A share of a stage's opening steps: in (0, 1), and only with the feature that spends it (set without it, it
    would be silently ignored)."""
    if share is None:
        return []
    if not used:
        return [f"{name} is the share of a stage's steps that {feature} takes; it does nothing without it: add "
                f"--{feature.replace('_', '-')} or drop --{name.replace('_', '-')}"]
    if not (0.0 < share < 1.0):
        return [f"{name} must be in (0, 1), got {share}"]
    return []


OPENING_SHARE = 0.5  # default share of a stage's steps for mask learning / gradual demolition


# What a run's state.json records of settings its version named otherwise, read as this version names them, so that
# --resume compares like with like (core/rundir.check_resume_config). Older versions filled the shares in at 0.5
# even with their feature off (unused; now None, and refused when set), and held the teacher in fp32 throughout
# (no teacher_precision: a run resumed at the default auto keeps fp32, which on a GPU auto would change mid-run).
STARTED_WITHOUT = {"teacher_precision": "fp32"}


def as_started(recorded: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``recorded``, a saved run config, as this version's fields read it; the settings of ``now`` that a run which
    predates them adopts: those left at auto take the value the run ran with). See STARTED_WITHOUT."""
    saved = dict(recorded)
    for share, feature in (("mask_learning_share", "mask_learning"), ("demolition_share", "demolition")):
        if saved.get(feature) == "off":
            saved[share] = None
    adopt = {}
    for key, value in STARTED_WITHOUT.items():
        if key not in recorded:
            saved[key] = value
            if now.get(key) == "auto":
                adopt[key] = value
    return saved, adopt


CALIB_BATCHES = 4  # default calibration batches of the weight criteria (wanda, magnitude, taylor)
# Calibration sequences of importance fisher. One-shot channels:0.5 on the demo (seed 0, held-out KL before any
# training; a one-off sweep through the library, no script): 32 sequences 0.081, 64: 0.074, 128: 0.073, 256: 0.068;
# Wanda 0.086 at 32, 0.081 at 128.
FISHER_CALIB_SEQUENCES = 256
STAGES_CONTINUOUS = 3  # unstructured / channels: stages from dense to the target
DEFAULT_STEP_BUDGET = 300  # optimizer steps of a default run, over all its stages


def default_stages(pattern: str) -> int:
    """Staging pays where removal is heavy: one stage for n:m and for targets removing at most half of the weights
    (one-shot + KD beat 3 stages at 2:4 and channels:0.5 on both benchmark teachers and at unstructured:0.5 on the
    demo, every seed), STAGES_CONTINUOUS above that (unstructured:0.8: 0.90× / 0.79× one-shot + KD's KL). With the
    channel defaults (Fisher scores, LS refit) 3 stages at channels:0.5 are 1.08× one stage on the demo and 0.81× on
    the wide teacher: split, so the rule stands."""
    if re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", pattern):
        return 1
    kind, _, arg = pattern.partition(":")
    try:
        return 1 if float(arg) <= 0.5 else STAGES_CONTINUOUS
    except ValueError:  # auto (it searches stage by stage) or a malformed spec (reported by _problems)
        return STAGES_CONTINUOUS


def _resolve_defaults(cfg: DistillConfig) -> None:
    """Fill the pattern-dependent defaults (stages, steps per stage) the user left open."""
    channels = str(cfg.pattern).strip().startswith("channels")
    learning = cfg.mask_learning not in (None, "off")  # sr-ste chooses its masks itself (_problems says why)
    if cfg.importance is None:
        cfg.importance = "fisher" if channels and not learning else "wanda"
    if cfg.compensation is None:
        # a gradual demolition asked for has the removed channels fade out instead (the two do not combine)
        cfg.compensation = "ls" if channels and cfg.demolition != "gradual" and not learning else "off"
    if cfg.calib_batches is None:
        batch = cfg.batch_size if isinstance(cfg.batch_size, int) and cfg.batch_size >= 1 else 1
        cfg.calib_batches = -(-FISHER_CALIB_SEQUENCES // batch) if cfg.importance == "fisher" else CALIB_BATCHES
    if cfg.stages is None:
        cfg.stages = default_stages(str(cfg.pattern))
    if cfg.allocation is None:
        per_layer = re.fullmatch(r"\s*unstructured\s*:\s*[0-9.eE+-]+\s*", str(cfg.pattern))
        cfg.allocation = "loadpath" if per_layer else "uniform"
    k = topk_access(cfg.teacher_access)
    if k is not None and cfg.operator == _default("operator"):  # a top-K teacher's buckets are the topk:K operator's
        cfg.operator = f"topk:{k}"
    if cfg.mask_learning_share is None and learning:
        cfg.mask_learning_share = OPENING_SHARE
    if cfg.demolition_share is None and cfg.demolition != "off":
        cfg.demolition_share = OPENING_SHARE
    if cfg.steps_per_stage is None:  # (a bad stage count is reported by _problems; the budget stays valid)
        stages = cfg.stages if isinstance(cfg.stages, int) and cfg.stages >= 1 else 1
        cfg.steps_per_stage = max(1, DEFAULT_STEP_BUDGET // stages)


def build_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """Recipe (YAML) values, then non-None ``overrides`` on top; raises ConfigError listing all problems."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError([f"recipe {str(recipe)!r} does not exist"])
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}"]) from None
        except UnicodeDecodeError as e:
            raise ConfigError([f"recipe {path} is not UTF-8 text ({e.reason} at byte {e.start}); save the YAML "
                               "file as UTF-8"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"recipe {path} must be a mapping of keys to values"])
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                problems.append(f"unknown recipe key {key!r}")
                continue
            values[name] = _coerce(name, value, problems)
        if any(p.startswith("unknown recipe key") for p in problems):
            problems.append(f"allowed keys: {', '.join(sorted(FIELDS))}")
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in FIELDS:
            problems.append(f"unknown option {name!r}")
            continue
        values[name] = _coerce(name, value, problems)
    cfg = DistillConfig(**values)
    _resolve_defaults(cfg)
    problems.extend(_problems(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg
