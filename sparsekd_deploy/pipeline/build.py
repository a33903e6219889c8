"""``build``: chains the steps' typed results — DistillRun (core ``Result``) → ExportResult → Bundle →
ValidationReport — into one bundle validated on its target runtime."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..bundle import Bundle, BundleError, BundleWriter
from ..config import DistillConfig, as_started, settle_qat_target
from ..core.patterns import NM, make_pattern
from ..errors import Interrupted
from ..locks import dir_lock
from .export_step import ExportResult, QuantizeRequest, export_and_audit
from .manifest import build_manifest

if TYPE_CHECKING:
    from ..validate.validator import ValidationReport


@dataclass
class BuildOptions:
    target: str = "onnxruntime"
    provider: str = "cpu"
    opset: int | None = None
    fp16: bool = False
    run_dir: str | None = None  # default: <out>.run beside the bundle
    overwrite: bool = False
    resume: bool = False
    profile: object = None  # trt_profiles.Profile for --target tensorrt
    workspace_mib: int = 4096


@dataclass
class BuildResult:
    bundle: Path
    run_dir: Path
    distillation: dict  # the run's summary.json
    validation: ValidationReport | None = None
    engine: dict | None = None
    shortfall: str | None = None  # why and at what cost the target was not reached (None when it was)
    notes: list[str] = field(default_factory=list)
    quantized_validation: ValidationReport | None = None  # the quantized graph's own validation (--quantize)

    @property
    def reached_target(self) -> bool:
        return bool(self.distillation.get("reached_target"))

    @property
    def passed(self) -> bool:
        return self.reached_target and all(v is None or v.passed for v in (self.validation, self.quantized_validation))

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle), "run_dir": str(self.run_dir), "distillation": self.distillation,
                "validation": self.validation.to_dict() if self.validation else None, "engine": self.engine, "shortfall": self.shortfall,
                "quantized_validation": self.quantized_validation.to_dict() if self.quantized_validation else None}


def default_run_dir(out: Path) -> Path:
    """The distillation run sits beside its bundle (``dist/x`` → ``dist/x.run``), where the user can find it."""
    return out.with_name(out.name + ".run")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an unusable bundle path before hours of distillation, not after."""
    if out.name in ("", ".", ".."):
        raise BundleError(f"--out {out} names an existing directory by a relative step; name the bundle dir, e.g. "
                          "dist/my-model")
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is a file; name a directory for the bundle")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BundleError(f"bundle dir {out} exists; pass --overwrite to replace it")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"cannot write the bundle under {parent} (not a writable directory); choose another --out")


def build(cfg: DistillConfig, out: str | Path, opts: BuildOptions | None = None, reporter=None, gates=None
          ) -> BuildResult:
    from ..core.result import NullReporter

    opts = opts or BuildOptions()
    reporter = reporter or NullReporter()
    out = Path(out)
    settle_qat_target(cfg, opts.target)  # a QAT stage simulates the graph this build exports, as the CLI's build does
    from ..core.distributed import Team, check_global_batch

    check_global_batch(cfg.batch_size)
    team = Team.launched()  # under torchrun / accelerate launch the main process checks, locks and writes
    team.on_main(check_out, out, opts.overwrite)
    from ..exporters.quantize import check_mode

    check_mode(cfg.quantize, opts.target)  # a mode the target cannot run is refused before the distillation
    from ..exporters.onnx import check_opset

    check_opset(opts.opset)
    run_dir = Path(opts.run_dir) if opts.run_dir else default_run_dir(out)
    cfg.out = str(run_dir)

    if team.distributed:
        return _build_launched(team, cfg, out, run_dir, opts, reporter, gates)
    with dir_lock(out):  # a second build into the same bundle is refused, naming this one (pid, start time)
        return _build_locked(cfg, out, run_dir, opts, reporter, gates)


def _reuses_run(run, opts: BuildOptions) -> bool:
    """Whether a rebuild takes the finished run it made before (instead of distilling again)."""
    from ..core.rundir import STATE

    finished = (run.final / "summary.json").is_file() and not (run.partial / STATE).is_file()
    return finished and (opts.resume or not opts.overwrite)


def _build_launched(team, cfg: DistillConfig, out: Path, run_dir: Path, opts: BuildOptions, reporter, gates
                    ) -> BuildResult:
    """A build under torchrun / accelerate launch: the main process holds the bundle's lock and does all of
    ``_build_locked``; the other ranks take their share of the distillation (unless a finished run is reused)
    and stop there: export, bundle and validation are the main process's."""
    import contextlib

    from ..core.distill import Result, distill
    from ..core.rundir import RunDir

    with contextlib.ExitStack() as held:
        def lock_and_look() -> dict | None:
            held.enter_context(dir_lock(out))
            run = RunDir(cfg.out)
            return Result.from_dir(run.final).summary if _reuses_run(run, opts) else None

        reused = team.on_main(lock_and_look)
        if team.is_main:
            return _build_locked(cfg, out, run_dir, opts, reporter, gates)
        summary = reused if reused is not None else distill(cfg, resume=opts.resume, overwrite=opts.overwrite).summary
        return BuildResult(out, run_dir, summary)


def _build_locked(cfg: DistillConfig, out: Path, run_dir: Path, opts: BuildOptions, reporter, gates) -> BuildResult:
    from ..core.distill import Result, distill
    from ..core.rundir import STATE, RunDir, read_run_data

    run = RunDir(cfg.out)
    if _reuses_run(run, opts):
        # A rebuild finds the run it made before: the same flags reuse it, other flags are named, never mixed
        # (--overwrite alone redoes it; with --resume it replaces only the bundle).
        differ = _differing_flags(run.final / STATE, cfg)
        if differ:
            raise BundleError(f"distillation run {run.final} was made with other settings ({differ}); pass "
                              "--overwrite to redo it, or --run-dir to keep both")
        reporter.note(f"reusing the finished distillation run in {run.final} (same settings; --overwrite without --resume redoes it)")
        result = Result.from_dir(run.final)
    else:
        result = distill(cfg, resume=opts.resume, overwrite=opts.overwrite, reporter=reporter)
    data_file = result.out / "data.safetensors"
    if not data_file.is_file():
        raise BundleError(f"run dir {result.out} has no data.safetensors (replaced by another run?); rebuild with "
                          "--overwrite instead of --resume")
    data = read_run_data(data_file)
    heldout = data["heldout"]
    # Static quantization calibrates on the run's own training sequences; the held-out ones judge it.
    quantize = QuantizeRequest(cfg.quantize, opts.target, cfg.calibration, data["train"].numpy(),
                               cfg.calibration_samples, f"the training split of {data_file}")
    pattern = make_pattern(cfg.pattern)
    writer = BundleWriter(out, overwrite=opts.overwrite)
    try:
        exported = export_and_audit(result.out / "student", writer.dir / "model.onnx", pattern,
                                    fp16=opts.fp16 or opts.target == "tensorrt", opset=opts.opset,
                                    prompts=heldout[:4, :64], reporter=reporter, quantize=quantize,
                                    target=opts.target)
        exported.write_reports(writer.dir)
        _copy_run_files(result.out, writer.dir, opts.target)
        if opts.target == "tensorrt":
            _write_engine_step(writer.dir, exported, opts)
        reporter.note("recording teacher references")
        from ..models.loading import load_model, load_tokenizer, resolve_teacher
        from ..validate.references import record

        teacher_dir = resolve_teacher(cfg.teacher)
        # The tokenizer (when there is one) makes the prompt edits of the sensitivity references.
        record(load_model(teacher_dir, role="teacher"), heldout, writer.dir,
               tokenizer=load_tokenizer(teacher_dir, cfg.tokenizer, required=False))
        sparsity = json.loads((result.out / "sparsity.json").read_text())
        writer.commit(build_manifest(out.name, cfg, opts, gates, result, exported, sparsity, teacher_dir, run_dir))
    except BaseException:
        writer.abort()
        raise
    res = BuildResult(out, run_dir, result.summary, shortfall=_shortfall(cfg, pattern, result, exported))
    try:
        _validate_on_target(res, opts, gates, reporter, teacher_dir)
    except KeyboardInterrupt:
        # The bundle is complete (committed above); only its validation was cut. The generic hint (--resume) would
        # be refused, as the bundle exists: say what is on disk and the command that finishes the job.
        raise Interrupted(f"interrupted while validating: bundle {out} is written but not validated; run "
                          f"{_validate_line(out, gates)}") from None
    return res


def _validate_line(out: Path, gates) -> str:
    """`sparsekd-deploy validate OUT` with the gates this build was given (validate's own defaults otherwise)."""
    from ..exporters.trt_profiles import shell_line
    from ..validate.gate import Gates, validate_flags

    flags = validate_flags(gates.to_dict() if gates is not None else {}, leave_out=Gates().to_dict())
    return shell_line(["sparsekd-deploy", "validate", str(out), *flags])


EXPORT_ONLY = ("quantize", "calibration", "calibration_samples", "qat_target")


def _differing_flags(state_file: Path, cfg: DistillConfig) -> str:
    """'lr=0.0005 (now 0.001), …' for every setting of a finished run that differs from ``cfg`` ('' when none)."""
    try:
        recorded = json.loads(state_file.read_text()).get("config", {})
        saved, adopt = as_started(recorded, cfg.to_dict())  # a run of an older version, as this one reads it
    except (OSError, ValueError, AttributeError, TypeError):
        return f"its {state_file.name} is missing or unreadable"
    now = {**cfg.to_dict(), **adopt}
    same_run = ("out", *EXPORT_ONLY)  # settings that change the export, never the distillation
    if now.get("qat_steps") or saved.get("qat_steps"):  # ... except when a QAT stage trained against them
        same_run = ("out", "calibration")
    return ", ".join(f"{k}={saved[k]} (now {now[k]})" for k in now if k not in same_run and k in saved and saved[k] != now[k])


def _write_engine_step(bundle_dir: Path, exported: ExportResult, opts: BuildOptions) -> None:
    from ..exporters.engine_step import write_device_step
    from ..exporters.trt_profiles import Profile
    from ..models.loading import max_positions

    limit = max_positions(exported.config)
    profile = opts.profile or Profile.from_cli(None, None, None, limit)
    profile.check(limit)
    q = exported.quantization  # a Q/DQ graph for TensorRT (int8, fp8, int4-weight): the engine is built from it
    write_device_step(bundle_dir, profile, fp16=True, sparse=exported.sparse_nm, workspace_mib=opts.workspace_mib,
                      quantization={"mode": q["mode"], "file": Path(q["path"]).name} if q else None)


def _copy_run_files(run_dir: Path, bundle_dir: Path, target: str) -> None:
    student_dir = run_dir / "student"
    tok_dir = bundle_dir / "tokenizer"
    for f in student_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            tok_dir.mkdir(exist_ok=True)
            shutil.copy2(f, tok_dir / f.name)
    shutil.copy2(student_dir / "config.json", bundle_dir / "config.json")
    for name in ("sparsity.json", "trajectory.json", "trajectory.png"):
        shutil.copy2(run_dir / name, bundle_dir / name)
    if target == "torch":  # the torch target runs the safetensors weights themselves
        shutil.copytree(student_dir, bundle_dir / "student")


def _shortfall(cfg: DistillConfig, pattern, result, exported: ExportResult) -> str | None:
    """Plain words for a run that stopped before its target: what the student holds, what that costs, what to try."""
    if result.reached_target:
        return None
    s = result.summary
    holds = (f"the student holds {cfg.pattern} in {exported.pattern_share:.0%} of its groups, and a partial "
             f"{cfg.pattern} pattern gets no sparse-tensor-core speed-up" if isinstance(pattern, NM)
             and exported.pattern_share is not None else f"the student is {s.get('sparsity', 0):.1%} sparse")
    return (f"target {cfg.pattern} not reached ({result.reason}; kept stage {s.get('final_stage')} of "
            f"{s.get('stages')}): {holds}. To reach it: a larger --kl-budget (now {cfg.kl_budget}), more "
            f"--steps-per-stage (now {cfg.steps_per_stage}) or --retries (now {cfg.retries}), or more --stages "
            f"(now {cfg.stages})")


def _validate_on_target(res: BuildResult, opts: BuildOptions, gates, reporter, teacher_dir: Path) -> None:
    """Validate where the target runs; where it cannot run here, validate the ONNX on CPU and say so."""
    from ..exporters.trt_compat import this_machine
    from ..exporters.trt_profiles import shell_line
    from ..validate.validator import validate_bundle

    out = res.bundle
    runtime, provider = "onnxruntime", opts.provider
    here = this_machine()
    if opts.target == "tensorrt":
        step = json.loads((out / "engine_build.json").read_text())
        if here["tensorrt_version"] and here["compute_capability"]:
            from .engine import build_into_bundle

            built = build_into_bundle(Bundle.open(out), opts.profile, fp16=True, sparse=True,
                                      workspace_mib=opts.workspace_mib)
            res.engine = {**built.engine, "sparsity": built.sparsity["summary"]}
            runtime = "tensorrt"
        else:
            from rich.markup import escape

            res.engine = {"status": "to be built on the device", **step}

            def line(argv, bundle):
                return shell_line([bundle if a == "<BUNDLE>" else a for a in argv])

            reporter.note(escape(
                "TensorRT/GPU not available here: the engine will be built on the device. There run\n"
                f"    {line(step['python_builder'], str(out))}\n"
                "  or, with trtexec (TensorRT 10.x; the 11.x line is in engine_build.json), in the bundle dir:\n"
                f"    {step['trtexec_tensorrt10_line']} > trtexec.log 2>&1\n"
                f"    {line(step['trtexec_register'], '.')}\n"
                "  Validating the ONNX graph on onnxruntime (CPU) meanwhile."))
            provider = "cpu"
    elif opts.target == "torch":
        if here["compute_capability"]:
            runtime, provider = "torch", "cuda"
        else:
            reporter.note("no CUDA GPU here: validating on onnxruntime (CPU); run `validate --runtime torch` on the GPU")
            provider = "cpu"
    reporter.note(f"bundle written to {out}; validating on {runtime} ({provider})")
    res.validation = validate_bundle(Bundle.open(out), runtime, provider, gates, teacher=teacher_dir)
    q = Bundle.open(out).manifest.get("quantization")
    if q:  # the quantized graph answers for itself, against the same references and gates
        q_provider = provider if runtime == "onnxruntime" else "cpu"
        reporter.note(f"validating the {q['mode']} graph {q['file']} on onnxruntime ({q_provider})")
        res.quantized_validation = validate_bundle(Bundle.open(out), "onnxruntime", q_provider, gates,
                                                   model=q["file"], teacher=teacher_dir)
