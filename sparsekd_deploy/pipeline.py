"""``build``: distill → export ONNX (+ FP16) → parity → sparsity audit → teacher references → bundle → validate."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from .bundle import Bundle, BundleWriter
from .config import DistillConfig
from .core.patterns import NM, make_pattern
from .exporters.trt_profiles import shell_line
from .models.loading import max_positions


@dataclass
class BuildOptions:
    target: str = "onnxruntime"
    provider: str = "cpu"
    opset: int | None = None
    fp16: bool = False
    run_dir: str | None = None
    overwrite: bool = False
    resume: bool = False
    profile: object = None  # trt_profiles.Profile for --target tensorrt
    workspace_mib: int = 4096


def weights_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def build(cfg: DistillConfig, out: str | Path, opts: BuildOptions, reporter, gates=None) -> dict:
    from safetensors.torch import load_file

    from .core.distill import distill

    out = Path(out)
    cfg.out = str(Path(opts.run_dir) if opts.run_dir else Path("runs") / out.name)
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        from .bundle import BundleError

        raise BundleError(f"bundle dir {out} exists; pass --overwrite to replace it")

    from .core.distill import Result
    from .core.rundir import STATE, RunDir

    run = RunDir(cfg.out)
    if opts.resume and (run.final / "summary.json").is_file() and not (run.partial / STATE).is_file():
        reporter.note(f"reusing the finished distillation run in {run.final}")
        result = Result.from_dir(run.final)
    else:
        result = distill(cfg, resume=opts.resume, overwrite=opts.overwrite, reporter=reporter)
    heldout = load_file(str(result.out / "data.safetensors"))["heldout"]
    writer = BundleWriter(out, overwrite=opts.overwrite)
    try:
        exported = _export_and_audit(result, cfg, opts, heldout[:4, :64], writer.dir, reporter)
        _copy_run_files(result.out, writer.dir, opts.target)
        if opts.target == "tensorrt":
            from .exporters.engine_step import write_device_step
            from .exporters.trt_profiles import Profile

            limit = max_positions(exported["student"].config)
            profile = opts.profile or Profile.from_cli(None, None, None, limit)
            profile.check(limit)
            write_device_step(writer.dir, profile, fp16=True, sparse=exported["is_nm"], workspace_mib=opts.workspace_mib)
        reporter.note("recording teacher references")
        from .models.loading import load_model, resolve_teacher
        from .validate.references import record

        teacher_dir = resolve_teacher(cfg.teacher)
        record(load_model(teacher_dir), heldout, writer.dir)
        writer.commit(_manifest(out.name, cfg, opts, gates, result, exported, teacher_dir))
    except BaseException:
        writer.abort()
        raise
    return _validate_on_target(out, opts, gates, reporter, result.summary)


def _export_and_audit(result, cfg, opts: BuildOptions, prompts, bundle_dir: Path, reporter) -> dict:
    """ONNX (+ FP16) export, parity on real prompts, and proof that the n:m pattern survived each step."""
    from .exporters.audit import audit_onnx, audit_report, pruned_weights, require_pattern
    from .exporters.fp16 import convert_fp16
    from .exporters.onnx import export_onnx
    from .exporters.parity import check_parity
    from .models.loading import load_model

    student_dir = result.out / "student"
    sparsity = json.loads((result.out / "sparsity.json").read_text())
    pattern = make_pattern(cfg.pattern)
    reporter.note("exporting ONNX with KV cache")
    info = export_onnx(student_dir, bundle_dir / "model.onnx", opset=opts.opset, with_past=True)
    student = load_model(student_dir)
    graphs = ["model.onnx"]
    if opts.fp16 or opts.target == "tensorrt":
        reporter.note("converting to FP16")
        convert_fp16(bundle_dir / "model.onnx", bundle_dir / "model.fp16.onnx")
        graphs.append("model.fp16.onnx")
    is_nm = bool(isinstance(pattern, NM) and sparsity["layers"] and result.summary["final_stage"] > 0)
    weights = pruned_weights(student_dir, sparsity) if is_nm else {}
    parity, audits = {}, {}
    for graph in graphs:
        precision = "fp16" if "fp16" in graph else "fp32"
        parity[precision] = check_parity(student, bundle_dir / graph, prompts, precision)
        if is_nm:
            audits[graph] = audit_onnx(bundle_dir / graph, weights, pattern.n, pattern.m)
            require_pattern(audits[graph], graph)
    (bundle_dir / "audit.json").write_text(json.dumps({k: audit_report(v) for k, v in audits.items()}, indent=2))
    (bundle_dir / "parity.json").write_text(json.dumps(parity, indent=2))
    return {"info": info, "student": student, "sparsity": sparsity, "parity": parity, "is_nm": is_nm,
            "fp16": "model.fp16.onnx" in graphs}


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


def _manifest(name: str, cfg, opts: BuildOptions, gates, result, exported: dict, teacher_dir: Path) -> dict:
    student, sparsity, info = exported["student"], exported["sparsity"], exported["info"].to_dict()
    info.pop("path")
    manifest = {
        "name": name,
        "model": {"onnx": "model.onnx", "onnx_fp16": "model.fp16.onnx" if exported["fp16"] else None,
                  "architecture": student.config.model_type, "max_positions": max_positions(student.config),
                  "vocab_size": student.config.vocab_size, **info},
        "teacher": {"path": str(teacher_dir), "weights_sha256": weights_digest(teacher_dir)},
        "student": {"weights_sha256": weights_digest(result.out / "student"), "parameters": sparsity["parameters"]},
        "pattern": cfg.pattern, "achieved_sparsity": sparsity["overall_sparsity"],
        "distillation": {k: result.summary[k] for k in ("status", "reason", "reached_target", "final_stage",
                                                        "stages", "kl", "top1")},
        "trajectory": [{k: r.get(k) for k in ("label", "sparsity", "kl", "top1", "accepted")} for r in result.trajectory],
        "target": {"runtime": opts.target, "requires": REQUIRES[opts.target]},
        "parity": exported["parity"],
    }
    if gates is not None:
        manifest["gates"] = gates.to_dict()
    return manifest


REQUIRES = {"onnxruntime": {"onnxruntime": ">=1.20"},
            "tensorrt": {"tensorrt": ">=10.0", "compute_capability": ">=8.0 for sparse tactics"},
            "torch": {"torch": ">=2.4", "cuda": "compute capability >=8.0 for 2:4 kernels"}}


def _validate_on_target(out: Path, opts: BuildOptions, gates, reporter, distillation: dict) -> dict:
    """Validate where the target runs; where it cannot run here, validate the ONNX on CPU and say so."""
    from .exporters.trt_compat import this_machine
    from .validate.validator import validate_bundle

    res = {"bundle": str(out), "distillation": distillation, "validation": None, "engine": None}
    runtime, provider = "onnxruntime", opts.provider
    here = this_machine()
    if opts.target == "tensorrt":
        step = json.loads((out / "engine_build.json").read_text())
        if here["tensorrt_version"] and here["compute_capability"]:
            from .bundle import Bundle as _B
            from .commands.engine import build_into_bundle

            built = build_into_bundle(_B.open(out), opts.profile, fp16=True, sparse=True,
                                      workspace_mib=opts.workspace_mib)
            res["engine"] = {**built.engine, "sparsity": built.sparsity["summary"]}
            runtime = "tensorrt"
        else:
            res["engine"] = {"status": "to be built on the device", **step}
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
    res["validation"] = validate_bundle(Bundle.open(out), runtime, provider, gates)
    return res
