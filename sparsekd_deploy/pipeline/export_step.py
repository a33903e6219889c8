"""The export-and-audit step shared by ``build`` and ``export``: ONNX (+ FP16), parity on real prompts, and proof
that every graph kept exactly the student's zeros (with the n:m share they form)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..core.patterns import NM, Pattern


@dataclass
class ExportResult:
    info: dict  # exporter, opset, with_past, external_data, precision (ExportInfo.to_dict without the path)
    graphs: dict[str, Path]  # precision -> graph file
    parity: dict[str, dict]  # precision -> numbers (empty when no prompts were given)
    audits: dict[str, dict]  # graph file name -> audit report
    config: object  # the student's transformers config
    pattern_share: float | None = None  # share of n:m groups the student holds (None: not an n:m pattern)

    @property
    def sparse_nm(self) -> bool:
        """The student holds some n:m groups, so SPARSE_WEIGHTS is worth asking TensorRT for."""
        return bool(self.pattern_share)

    @property
    def full_nm(self) -> bool:
        """Every pruned group holds the pattern: the whole student can run on sparse tensor cores."""
        return self.pattern_share is not None and self.pattern_share >= 1.0

    def write_reports(self, out_dir: Path) -> None:
        (out_dir / "audit.json").write_text(json.dumps(self.audits, indent=2))
        (out_dir / "parity.json").write_text(json.dumps(self.parity, indent=2))


def fp16_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + ".fp16.onnx")


def export_and_audit(student_dir: Path, onnx_path: Path, pattern: Pattern | None, *, fp16: bool,
                     opset: int | None = None, with_past: bool = True, prompts=None, reporter=None) -> ExportResult:
    """Export ``student_dir`` to ``onnx_path`` (and an FP16 copy), check parity on ``prompts`` (token ids) where
    given, and audit every graph against the student's own zeros. Raises ``SparsityLostError`` when a graph lost
    any zero or n:m group the student holds, ``ParityError`` when a graph disagrees with PyTorch."""
    from ..exporters.audit import audit_onnx, audit_report, require_pattern, student_pattern_share, zeroed_weights
    from ..exporters.fp16 import convert_fp16
    from ..exporters.onnx import export_onnx
    from ..models.loading import load_model
    from .parity import check_parity

    note = reporter.note if reporter is not None else (lambda _msg: None)
    note("exporting ONNX with KV cache" if with_past else "exporting ONNX")
    info = export_onnx(student_dir, onnx_path, opset=opset, with_past=with_past).to_dict()
    info.pop("path")
    graphs = {"fp32": onnx_path}
    if fp16:
        note("converting to FP16")
        graphs["fp16"] = convert_fp16(onnx_path, fp16_path(onnx_path))
    student = load_model(student_dir)
    pruned = zeroed_weights(student)
    n, m = (pattern.n, pattern.m) if isinstance(pattern, NM) else (None, None)
    parity, audits, share = {}, {}, None
    for precision, graph in graphs.items():
        if prompts is not None:
            parity[precision] = check_parity(student, graph, prompts, precision)
        if pruned:
            results = audit_onnx(graph, pruned, n, m)
            require_pattern(results, graph.name, n, m)
            audits[graph.name] = audit_report(results)
            share = student_pattern_share(results) if n else None
    return ExportResult(info, graphs, parity, audits, student.config, share)
