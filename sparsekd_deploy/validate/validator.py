"""Validate a bundle on a target runtime against its teacher references."""

from __future__ import annotations

import datetime as _dt
import platform

from ..bundle import Bundle
from ..targets.base import make_target
from . import metrics as M
from .gate import Gates, evaluate
from .references import References


def _model_for(bundle: Bundle, runtime: str, model: str | None) -> tuple[str, dict]:
    """Which file of the bundle a runtime runs, and its options."""
    from ..bundle import BundleError

    if model:
        return model, {}
    if runtime == "tensorrt":
        if "engine" not in bundle.manifest:
            raise BundleError(f"bundle {bundle.path} has no engine yet; build it on the device with "
                              f"`sparsekd-deploy engine build {bundle.path}` (or add one built by trtexec with "
                              f"`sparsekd-deploy engine add`; the lines are in engine_build.json)")
        return bundle.manifest["engine"]["plan"], {"engine": bundle.manifest["engine"]}
    if runtime == "torch":
        if not bundle.has("student/config.json"):
            raise BundleError(f"bundle {bundle.path} has no student weights; build it with --target torch")
        return "student/config.json", {"dir_of_file": True}
    return bundle.manifest["model"]["onnx"], {}


def _full_kl(bundle: Bundle, student_logits, refs: References) -> float | None:
    """KL over the whole vocabulary where the teacher itself is present (kl_topk is only a lower bound)."""
    from pathlib import Path

    teacher = bundle.manifest.get("teacher", {})
    path = Path(teacher.get("path") or "/nonexistent")
    if not (path / "config.json").is_file():
        return None
    from ..pipeline import weights_digest

    if weights_digest(path) != teacher.get("weights_sha256"):
        return None  # a different model now sits at that path
    import numpy as np
    import torch

    from ..models.loading import load_model

    ids = refs.tensors["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(load_model(path)(input_ids=torch.from_numpy(ids)).logits.double(), -1).numpy()
    logq = M.log_softmax(student_logits)
    return float((np.exp(logp) * (logp - logq)).sum(-1).mean())


def validate_bundle(bundle: Bundle, runtime: str = "onnxruntime", provider: str = "cpu", gates: Gates | None = None,
                    model: str | None = None) -> dict:
    gates = gates or Gates()
    gates.check_ranges()
    refs = References.load(bundle)
    rel, options = _model_for(bundle, runtime, model)
    target = make_target(runtime, bundle.file(rel), provider=provider,
                         max_positions=bundle.manifest["model"].get("max_positions"), **options)
    logits = target.logits(refs.tensors["input_ids"])  # one pass serves the top-k and the full KL
    metrics = M.run_all(target, refs, logits)
    metrics["kl_full"] = _full_kl(bundle, logits, refs)
    rows = evaluate(metrics, gates)
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(bundle.path), "model": rel, "runtime": target.describe(),
        "device": {"machine": platform.machine(), "node": platform.node(), "processor": platform.processor()},
        "thresholds": gates.to_dict(), "metrics": metrics, "gates": rows, "passed": all(r["passed"] for r in rows),
    }
    from .report import plot

    report["plots"] = [str(p) for p in plot(report, bundle.path / "validation")]
    bundle.write_validation(report)
    return report
