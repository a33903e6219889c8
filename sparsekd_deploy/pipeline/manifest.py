"""What ``build`` records in a bundle's manifest (the files table is added by ``BundleWriter.commit``)."""

from __future__ import annotations

from pathlib import Path

from ..digests import weights_digest
from .export_step import ExportResult

REQUIRES = {"onnxruntime": {"onnxruntime": ">=1.20"},
            "tensorrt": {"tensorrt": ">=10.0", "compute_capability": ">=8.0 for sparse tactics"},
            "torch": {"torch": ">=2.4", "cuda": "compute capability >=8.0 for 2:4 kernels"}}


def build_manifest(name: str, cfg, opts, gates, result, exported: ExportResult, sparsity: dict, teacher_dir: Path,
                   run_dir: Path) -> dict:
    from ..models.loading import max_positions

    config = exported.config
    manifest = {
        "name": name,
        "model": {"onnx": "model.onnx", "onnx_fp16": "model.fp16.onnx" if "fp16" in exported.graphs else None,
                  "architecture": config.model_type, "max_positions": max_positions(config),
                  "vocab_size": config.vocab_size, **exported.info},
        # The teacher's path is where it was on the build host: a hint for `validate --teacher`, never read silently.
        "teacher": {"path": str(teacher_dir), "weights_sha256": weights_digest(teacher_dir)},
        "student": {"weights_sha256": weights_digest(result.out / "student"), "parameters": sparsity["parameters"]},
        "pattern": cfg.pattern, "achieved_sparsity": sparsity["overall_sparsity"],
        "pattern_share": exported.pattern_share,
        "distillation": {**{k: result.summary[k] for k in ("status", "reason", "reached_target", "final_stage",
                                                           "stages", "kl", "top1")}, "run_dir": str(run_dir)},
        "trajectory": [{k: r.get(k) for k in ("label", "sparsity", "kl", "top1", "accepted")} for r in result.trajectory],
        "target": {"runtime": opts.target, "requires": REQUIRES[opts.target]},
        "parity": exported.parity,
    }
    q = exported.quantization
    if q:  # beside onnx_fp16: model.onnx_int8 = "model.int8.onnx" (…), and how it was made
        from ..precisions import manifest_key

        rel = Path(q["path"]).name
        manifest["model"][manifest_key(q["mode"])] = rel
        manifest["quantization"] = {"file": rel, **{k: v for k, v in q.items() if k != "path"}}
    if gates is not None:
        manifest["gates"] = gates.to_dict()
    return manifest
