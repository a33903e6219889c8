"""Validate a bundle on a target runtime against its teacher references."""

from __future__ import annotations

import datetime as _dt
import errno
import platform
from dataclasses import asdict, dataclass, field

from ..bundle import Bundle
from ..targets.base import make_target
from . import metrics as M
from .gate import Gates, evaluate, skipped_gates
from .references import References


@dataclass
class ValidationReport:
    """What one validation found; ``validation.json`` is its ``to_dict()``."""

    created: str
    bundle: str
    model: str  # the bundle file that ran
    runtime: dict  # the target's own description (runtime, provider, versions)
    device: dict
    thresholds: dict  # the gates applied
    metrics: dict  # kl_topk, top1_agreement, greedy_match, ppl_ratio, consistency…, kl_full (None without --teacher)
    gates: list[dict]  # one row per gate: gate, value, op, threshold, passed
    passed: bool
    plots: list[str] = field(default_factory=list)
    recorded: bool = False  # written into the bundle (False: the bundle is read-only)
    not_recorded_because: str | None = None
    plots_skipped_because: str | None = None  # e.g. no matplotlib on a lean device install

    def to_dict(self) -> dict:
        return asdict(self)


def _model_for(bundle: Bundle, runtime: str, model: str | None) -> tuple[str, dict]:
    """Which file of the bundle a runtime runs, and its options."""
    from ..bundle import BundleError

    if model is not None:
        return _named_graph(bundle, model), {}
    if runtime == "tensorrt":
        if "engine" not in bundle.manifest:
            raise BundleError(f"bundle {bundle.path} has no engine yet; build it on the device with "
                              f"`sparsekd-deploy engine build {bundle.path}` (or add one built by trtexec with "
                              f"`sparsekd-deploy engine add`; the lines are in engine_build.json)")
        engine = bundle.manifest["engine"]
        if not isinstance(engine, dict) or not isinstance(engine.get("plan"), str):
            raise BundleError(f"bundle {bundle.path}: manifest's engine section is malformed (no plan file named); "
                              "re-add the engine with `engine build` or `engine add`")
        return engine["plan"], {"engine": engine}
    if runtime == "torch":
        if not bundle.has("student/config.json"):
            raise BundleError(f"bundle {bundle.path} has no student weights; build it with --target torch")
        return "student/config.json", {"dir_of_file": True}
    return bundle.manifest["model"]["onnx"], {}


def check_model_name(model: str | None) -> None:
    """``--model`` given empty (``--model ''``, a shell variable that was not set) is a mistake, not a request for the
    default graph: it once fell back to model.onnx and validated a graph the user had not named."""
    if model is not None and not model.strip():
        from ..errors import ConfigError
        from ..precisions import PRECISIONS

        raise ConfigError([f"--model is empty ({model!r}): name a file of the bundle (model.int8.onnx) or a precision "
                           f"the manifest records ({', '.join(PRECISIONS)}), or leave --model out for the bundle's "
                           "model.onnx"])


def _named_graph(bundle: Bundle, model: str) -> str:
    """``--model`` as a bundle file (model.int8.onnx) or a precision the manifest records (int8 → model.onnx_int8)."""
    from ..bundle import BundleError
    from ..precisions import PRECISIONS, manifest_key

    if model not in PRECISIONS:
        return model
    rel = bundle.manifest["model"].get(manifest_key(model))
    if not isinstance(rel, str):
        have = [p for p in PRECISIONS if isinstance(bundle.manifest["model"].get(manifest_key(p)), str)]
        how = "--fp16" if model == "fp16" else f"--quantize {model}"
        raise BundleError(f"bundle {bundle.path} has no {model} graph (it has: {', '.join(have)}); build it with {how}")
    return rel


# Why an int8-dynamic graph fails the determinism gate, said where it fails (README, quantization).
PER_CALL_RANGES = ("this graph (int8-dynamic) takes each activation's int8 range per call, over the whole batch, so a "
                   "prompt's tokens depend on the prompts batched with it; --quantize int8 (ranges calibrated once) is "
                   "batch-invariant, and --no-determinism-gate accepts it where each call serves one prompt")


def _explain_batch_dependence(bundle: Bundle, rel: str, rows: list[dict]) -> None:
    from ..precisions import manifest_key

    if rel != bundle.manifest["model"].get(manifest_key("int8-dynamic")):
        return
    for row in rows:
        if row["gate"] == "deterministic" and not row["passed"]:
            row["note"] = PER_CALL_RANGES


def per_model_record(rel: str) -> str:
    """Where the last validation *of this graph* is kept (validation.json holds the last of any): inside the mutable
    validation/ dir, so recording it changes no checksum."""
    return f"validation/by-model/{rel.replace('/', '__')}.json"


def full_kl(bundle: Bundle, student_logits, refs: References, teacher_dir) -> float:
    """KL(teacher‖student) over the whole vocabulary (``kl_topk`` is only a lower bound). The teacher is named by the
    caller (``validate --teacher DIR``) and must be the one the bundle was distilled from, by its weights' digest."""
    from pathlib import Path

    from ..bundle import BundleError
    from ..digests import weights_digest

    path = Path(teacher_dir)
    if not (path / "config.json").is_file():
        raise BundleError(f"--teacher {path} is not a model dir (no config.json)")
    teacher = bundle.manifest.get("teacher")
    recorded = teacher.get("weights_sha256") if isinstance(teacher, dict) else None
    if weights_digest(path) != recorded:
        raise BundleError(f"--teacher {path} is not the teacher this bundle was distilled from (its weights' sha256 "
                          f"differs from the manifest's {str(recorded)[:12]}…)")
    import torch

    from ..models.loading import load_model
    from ..numerics import kl, log_softmax

    ids = refs.tensors["input_ids"]
    with torch.no_grad():
        logits = load_model(path)(input_ids=torch.from_numpy(ids)).logits.double().numpy()
    return float(kl(log_softmax(logits), log_softmax(student_logits)).mean())


def validate_bundle(bundle: Bundle, runtime: str = "onnxruntime", provider: str = "cpu", gates: Gates | None = None,
                    model: str | None = None, teacher=None, plots: bool = True, samples: int | None = None
                    ) -> ValidationReport:
    """Run the bundle's model on ``runtime`` against the stored teacher references and apply ``gates``. With
    ``teacher`` (the teacher's model dir) the full-vocabulary KL is measured too. The report is recorded in the
    bundle's ``validation.json``; where the bundle is read-only it is returned with ``recorded`` False. ``plots``
    False (or no matplotlib installed) writes no PNGs. ``samples``: repeat-prompt samples per prompt for the jitter
    measurement (default: the references' count; chunked to fit the runtime)."""
    check_model_name(model)
    gates = gates or Gates()
    gates.check_ranges()
    refs = References.load(bundle)
    rel, options = _model_for(bundle, runtime, model)
    target = make_target(runtime, bundle.file(rel), provider=provider,
                         max_positions=bundle.manifest["model"].get("max_positions"), **options)
    logits = target.logits(refs.tensors["input_ids"])  # one pass serves the top-k and the full KL
    metrics = M.run_all(target, refs, logits, samples=samples)
    metrics["kl_full"] = full_kl(bundle, logits, refs, teacher) if teacher is not None else None
    from .speed import decode_speed

    metrics["decode"] = decode_speed(target, refs.tensors["input_ids"][:1, : refs.meta["prefix"]],
                                     refs.meta["greedy_tokens"])
    rows = evaluate(metrics, gates)
    _explain_batch_dependence(bundle, rel, rows)
    metrics["stability"]["notes"] += skipped_gates(metrics, gates)
    report = ValidationReport(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), bundle=str(bundle.path), model=rel,
        runtime=target.describe(),
        device={"machine": platform.machine(), "node": platform.node(), "processor": platform.processor()},
        thresholds=gates.to_dict(), metrics=metrics, gates=rows, passed=all(r["passed"] for r in rows))
    from ..bundle import BundleReadOnlyError
    from .report import PLOTS_SKIPPED, can_plot, plot

    try:
        out = bundle.writable_dir("validation")
        if plots and can_plot():
            report.plots = [str(p) for p in plot(report.to_dict(), out)]
        elif plots:
            report.plots_skipped_because = PLOTS_SKIPPED
        report.recorded = True
        bundle.write_validation(report.to_dict())
        from ..bundle import confined
        from ..fsutil import write_json_atomic

        bundle.writable_dir("validation/by-model")
        write_json_atomic(confined(bundle.path, per_model_record(rel), "validation record"), report.to_dict())
    except (BundleReadOnlyError, OSError) as e:  # the plots go first: on a read-only bundle they fail first
        if not isinstance(e, BundleReadOnlyError) and e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        report.plots, report.recorded = [], False
        report.not_recorded_because = str(e) if isinstance(e, BundleReadOnlyError) else \
            f"bundle {bundle.path} is not writable ({e.strerror}): the verdict was not recorded"
    return report
