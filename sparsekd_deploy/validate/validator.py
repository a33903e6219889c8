"""Validate a bundle on a target runtime against its teacher references."""

from __future__ import annotations

import datetime as _dt
import platform

from ..bundle import Bundle
from ..targets.base import make_target
from . import metrics as M
from .gate import Gates, evaluate
from .references import References


def validate_bundle(bundle: Bundle, runtime: str = "onnxruntime", provider: str = "cpu", gates: Gates | None = None,
                    model: str | None = None) -> dict:
    gates = gates or Gates()
    gates.check_ranges()
    refs = References.load(bundle)
    rel = model or bundle.manifest["model"]["onnx"]
    target = make_target(runtime, bundle.file(rel), provider=provider,
                         max_positions=bundle.manifest["model"].get("max_positions"))
    metrics = M.run_all(target, refs)
    rows = evaluate(metrics, gates)
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(bundle.path), "model": rel, "runtime": target.describe(),
        "device": {"machine": platform.machine(), "node": platform.node(), "processor": platform.processor()},
        "thresholds": gates.to_dict(), "metrics": metrics, "gates": rows, "passed": all(r["passed"] for r in rows),
    }
    bundle.write_validation(report)
    from .report import plot

    report["plots"] = [str(p) for p in plot(report, bundle.path / "validation")]
    bundle.write_validation(report)
    return report
