"""``build``: distill → export ONNX (+ FP16) → parity → sparsity audit → teacher references → bundle → validate."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import Bundle, BundleWriter
from .config import DistillConfig
from .core.patterns import NM, make_pattern


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
    extra_manifest: dict = field(default_factory=dict)


def weights_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def build(cfg: DistillConfig, out: str | Path, opts: BuildOptions, reporter, gates=None) -> dict:

    from .core.distill import distill
    from .exporters.audit import audit_onnx, audit_report, pruned_weights, require_pattern
    from .exporters.fp16 import convert_fp16
    from .exporters.onnx import export_onnx
    from .exporters.parity import check_parity
    from .models.loading import load_model, resolve_teacher
    from .validate.references import record

    out = Path(out)
    run_dir = Path(opts.run_dir) if opts.run_dir else Path("runs") / out.name
    cfg.out = str(run_dir)
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        from .bundle import BundleError

        raise BundleError(f"bundle dir {out} exists; pass --overwrite to replace it")

    result = distill(cfg, resume=opts.resume, overwrite=opts.overwrite, reporter=reporter)
    student_dir = result.out / "student"
    sparsity = json.loads((result.out / "sparsity.json").read_text())
    pattern = make_pattern(cfg.pattern)
    from safetensors.torch import load_file

    data = load_file(str(result.out / "data.safetensors"))
    prompts = data["heldout"][:4, :64]

    writer = BundleWriter(out, overwrite=opts.overwrite)
    try:
        reporter.note("exporting ONNX with KV cache")
        info = export_onnx(student_dir, writer.dir / "model.onnx", opset=opts.opset, with_past=True)
        student = load_model(student_dir)
        parity = {"fp32": check_parity(student, writer.dir / "model.onnx", prompts, "fp32")}
        audits = {}
        is_nm = bool(isinstance(pattern, NM) and sparsity["layers"] and result.summary["final_stage"] > 0)
        weights = pruned_weights(student_dir, sparsity) if is_nm else {}
        if is_nm:
            audits["model.onnx"] = audit_onnx(writer.dir / "model.onnx", weights, pattern.n, pattern.m)
            require_pattern(audits["model.onnx"], "model.onnx")
        fp16 = opts.fp16 or opts.target == "tensorrt"
        if fp16:
            reporter.note("converting to FP16")
            convert_fp16(writer.dir / "model.onnx", writer.dir / "model.fp16.onnx")
            parity["fp16"] = check_parity(student, writer.dir / "model.fp16.onnx", prompts, "fp16")
            if is_nm:
                audits["model.fp16.onnx"] = audit_onnx(writer.dir / "model.fp16.onnx", weights, pattern.n, pattern.m)
                require_pattern(audits["model.fp16.onnx"], "model.fp16.onnx")
        tok_dir = writer.dir / "tokenizer"
        for f in student_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                tok_dir.mkdir(exist_ok=True)
                shutil.copy2(f, tok_dir / f.name)
        shutil.copy2(student_dir / "config.json", writer.dir / "config.json")
        for name in ("sparsity.json", "trajectory.json", "trajectory.png"):
            shutil.copy2(result.out / name, writer.dir / name)
        (writer.dir / "audit.json").write_text(json.dumps({k: audit_report(v) for k, v in audits.items()}, indent=2))
        (writer.dir / "parity.json").write_text(json.dumps(parity, indent=2))
        if opts.target == "torch":
            shutil.copytree(student_dir, writer.dir / "student")
        if opts.target == "tensorrt":
            from .exporters.engine_step import write_device_step
            from .exporters.trt_profiles import Profile

            max_pos_ = getattr(student.config, "max_position_embeddings", None) or getattr(student.config, "n_positions", None)
            profile = opts.profile or Profile.from_cli(None, None, None, max_pos_)
            profile.check(max_pos_)
            write_device_step(writer.dir, profile, fp16=True, sparse=is_nm, workspace_mib=opts.workspace_mib)

        reporter.note("recording teacher references")
        teacher_dir = resolve_teacher(cfg.teacher)
        teacher = load_model(teacher_dir)
        record(teacher, data["heldout"], writer.dir)
        max_pos = getattr(student.config, "max_position_embeddings", None) or getattr(student.config, "n_positions", None)
        manifest = {
            "name": out.name,
            "model": {"onnx": "model.onnx", "onnx_fp16": "model.fp16.onnx" if fp16 else None,
                      "architecture": student.config.model_type, "max_positions": max_pos,
                      "vocab_size": student.config.vocab_size, **info.to_dict(), "path": None},
            "teacher": {"path": str(teacher_dir), "weights_sha256": weights_digest(teacher_dir)},
            "student": {"weights_sha256": weights_digest(student_dir), "parameters": sparsity["parameters"]},
            "pattern": cfg.pattern, "achieved_sparsity": sparsity["overall_sparsity"],
            "distillation": {k: result.summary[k] for k in ("status", "reason", "reached_target", "final_stage",
                                                            "stages", "kl", "top1")},
            "trajectory": [{k: r.get(k) for k in ("label", "sparsity", "kl", "top1", "accepted")}
                           for r in result.trajectory],
            "target": {"runtime": opts.target, "requires": REQUIRES[opts.target]},
            "parity": parity,
            **opts.extra_manifest,
        }
        if gates is not None:
            manifest["gates"] = gates.to_dict()
        writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise
    return _validate_on_target(out, opts, gates, reporter, result.summary)


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
            reporter.note("TensorRT/GPU not available here: the engine will be built on the device. There run\n"
                          f"    {step['python_builder_line'].replace('<BUNDLE>', str(out))}\n  or with trtexec (TensorRT 10.x):\n"
                          f"    {step['trtexec_tensorrt10_line']}\n  Validating the ONNX graph on onnxruntime (CPU) meanwhile.")
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
