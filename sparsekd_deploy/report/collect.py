"""Gather what a report shows from a bundle dir or a distill run dir — every file optional except the trajectory.

A bundle is untrusted input: its JSON files are read through ``Bundle.read_json`` (confined, shape-checked); a run
dir is the user's own output and is read with the same care for damage (one clear error, no traceback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import MANIFEST, Bundle, BundleError, read_json_object


@dataclass
class ReportData:
    kind: str  # "bundle" | "run"
    path: Path
    name: str
    trajectory: dict  # budget, pattern, status, reason, stages[]
    sparsity: dict | None = None  # per-layer sparsity (sparsity.json)
    manifest: dict | None = None
    validation: dict | None = None  # the last validation.json
    engine: dict | None = None  # engine.sparsity.json (eligible vs sparse-tactic layers)
    audit: dict | None = None
    missing: list[str] = field(default_factory=list)  # what a reader might expect and is not there, with why

    @property
    def status(self) -> str:
        return str(self.trajectory.get("status", "unknown"))

    @property
    def stopped_early(self) -> bool:
        return self.status != "complete"


def _read_run_json(path: Path, what: str) -> dict | None:
    return read_json_object(path, what, f"the {what} is damaged; rerun the distillation")


def _checked(traj: dict, where: Path) -> dict:
    """A trajectory whose stages are records with numbers where numbers belong (a hand-edited or damaged file is one
    clear error, not a page of wrong numbers or a traceback)."""
    stages = traj.get("stages")
    if not isinstance(stages, list):
        raise BundleError(f"{where} has no list of stages; the trajectory is damaged")
    for i, s in enumerate(stages):
        if not isinstance(s, dict):
            raise BundleError(f"{where}: stage {i} is not a record; the trajectory is damaged")
        bad = [k for k in ("kl", "kl_after_prune", "sparsity", "top1", "budget")
               if s.get(k) is not None and (isinstance(s[k], bool) or not isinstance(s[k], (int, float)))]
        if bad:
            raise BundleError(f"{where}: stage {i} has non-numeric {', '.join(bad)}; the trajectory is damaged")
    return traj


def collect(path: str | Path) -> ReportData:
    p = Path(path)
    if not p.is_dir():
        raise BundleError(f"{p} is not a directory; pass a bundle (from `build`) or a run dir (from `distill`)")
    if (p / MANIFEST).is_file():
        b = Bundle.open(p)
        read = lambda rel, what: b.read_json(rel, what, "rebuild the bundle")  # noqa: E731
        traj = read("trajectory.json", "trajectory")
        dist = b.manifest.get("distillation") if isinstance(b.manifest.get("distillation"), dict) else {}
        data = ReportData("bundle", p, str(b.manifest.get("name") or p.name),
                          _checked(traj or {"stages": b.manifest.get("trajectory", []),
                                            **{k: dist.get(k) for k in ("status", "reason")},
                                            "pattern": b.manifest.get("pattern")}, p / "trajectory.json"),
                          sparsity=read("sparsity.json", "sparsity report"), manifest=b.manifest,
                          validation=b.read_validation(), audit=read("audit.json", "sparsity audit"))
        if b.has("engine.sparsity.json"):
            data.engine = read("engine.sparsity.json", "engine sparsity report")
        if data.validation is None:
            data.missing.append("validation: this bundle was never validated (`sparsekd-deploy validate BUNDLE`)")
        if data.engine is None:
            data.missing.append("engine: no TensorRT engine in this bundle (built on the device with `engine build`)")
        return data
    traj = _read_run_json(p / "trajectory.json", "trajectory")
    if traj is None:
        raise BundleError(f"{p} is neither a bundle (no {MANIFEST}) nor a distill run (no trajectory.json)")
    data = ReportData("run", p, p.name, _checked(traj, p / "trajectory.json"),
                      sparsity=_read_run_json(p / "sparsity.json", "sparsity report"))
    data.missing.append("validation: a run dir has no runtime validation (build a bundle from it: `build --resume`)")
    return data
