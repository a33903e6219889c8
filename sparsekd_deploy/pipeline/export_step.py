"""The export-and-audit step shared by ``build`` and ``export``: ONNX (+ FP16, + a quantized copy), parity on real
prompts, and proof that every graph kept exactly the student's zeros (with the n:m share they form)."""

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
    quantization: dict | None = None  # QuantizeInfo.to_dict() of the quantized copy (None: not quantized)

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


@dataclass
class QuantizeRequest:
    """What to quantize and with which data: ``calibration_ids`` [N, L] are *training* token ids (the held-out split
    judges the result and never calibrates it); ``source`` says where they came from, for the manifest."""

    mode: str
    target: str = "onnxruntime"
    method: str = "minmax"
    calibration_ids: object = None
    samples: int = 32
    source: str = ""


def calibration_feeds(onnx_path: Path, ids, batch: int = 8) -> list[dict]:
    """Feeds of the graph for a prompt pass with an empty KV cache, ``batch`` sequences each."""
    import numpy as np
    import onnx

    from ..exporters.decoder_feeds import graph_caches, step_feed

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs, caches = {i.name for i in graph.input}, graph_caches(graph)
    ids = np.asarray(ids, dtype=np.int64)
    return [step_feed(ids[start:start + batch], 0, inputs, caches) for start in range(0, len(ids), batch)]


def _quantize(onnx_path: Path, q: QuantizeRequest) -> tuple[Path, dict]:
    from ..exporters.quantize import STATIC, QuantizeError, quantize_onnx, quantized_path

    feeds, info = None, None
    if q.mode in STATIC:
        have = 0 if q.calibration_ids is None else len(q.calibration_ids)
        if have < q.samples:
            raise QuantizeError(f"--quantize {q.mode} calibrates on {q.samples} training sequences and "
                                f"{q.source or 'the calibration data'} holds {have}: lower --calibration-samples, or "
                                "distill on more data (--num-samples), or use --quantize int8-dynamic (no calibration)")
        ids = q.calibration_ids[: q.samples]
        feeds = calibration_feeds(onnx_path, ids)
        info = {"sequences": int(ids.shape[0]), "tokens_per_sequence": int(ids.shape[1]), "source": q.source}
    res = quantize_onnx(onnx_path, quantized_path(onnx_path, q.mode), q.mode, target=q.target, calibration=feeds,
                        calibration_info=info, method=q.method)
    return Path(res.path), res.to_dict()


def _fuse_for_ort(paths: list[Path], note, max_positions: int | None = None) -> dict:
    """Fuse each graph's attention for ONNX Runtime (in place), then its rotary and residual norms; the record says
    how many layers, per file, what ORT's fusers made of it (or why their graph was not kept), and why a file was not
    rewritten at all."""
    from ..exporters.ort_attention import fuse_attention

    note("fusing attention, rotary and norms for onnxruntime (com.microsoft ops)")
    record, tools = {}, []
    for path in paths:
        res = fuse_attention(path, max_positions=max_positions)
        record[path.name] = res.fused
        # the libraries that rewrote any of the files (ORT's fusers may have been kept for one file, not another)
        tools += [t for t in res.rewriter.split("; ") if t not in tools]
        record.update(op=res.op, rewriter="; ".join(tools))
        if res.ort_fusions is not None:
            record.setdefault("ort_fusions", {})[path.name] = res.ort_fusions
        if res.query_blocks is not None:
            record.setdefault("query_blocks", {})[path.name] = res.query_blocks
        if res.ort_skipped:
            record.setdefault("ort_fusions_skipped", {})[path.name] = res.ort_skipped
            note(f"  {path.name}: attention fused, rotary / norms left as exported: {res.ort_skipped}")
        if res.skipped:
            record.setdefault("skipped", {})[path.name] = res.skipped
            note(f"  {path.name} left unfused: {res.skipped}")
    return record


def export_and_audit(student_dir: Path, onnx_path: Path, pattern: Pattern | None, *, fp16: bool,
                     opset: int | None = None, with_past: bool = True, prompts=None, reporter=None,
                     quantize: QuantizeRequest | None = None, target: str | None = "onnxruntime") -> ExportResult:
    """Export ``student_dir`` to ``onnx_path`` (and an FP16 copy, and a ``quantize`` copy), check parity on ``prompts``
    (token ids) where given, and audit every graph against the student's own zeros — the quantized one read back from
    its integer codes. For the onnxruntime ``target`` the fp32 and quantized graphs then get ORT's fused attention
    (``exporters/ort_attention.py``; quantized from the plain graph first, so the quantizers see standard ONNX);
    TensorRT graphs and the FP16 copy stay standard ONNX. Raises ``SparsityLostError`` when a graph lost any zero or
    n:m group the student holds, ``ParityError`` when a graph disagrees with PyTorch."""
    from ..exporters.audit import audit_onnx, audit_report, require_pattern, student_pattern_share, zeroed_weights
    from ..exporters.fp16 import convert_fp16
    from ..exporters.onnx import export_onnx
    from ..models.loading import load_model, max_positions
    from .parity import check_parity

    note = reporter.note if reporter is not None else (lambda _msg: None)
    # Loaded first: a damaged student dir (cut weights, unreadable config.json) is then one ModelLoadError line,
    # not a traceback from inside the exporter.
    student = load_model(student_dir)
    note("exporting ONNX with KV cache" if with_past else "exporting ONNX")
    info = export_onnx(student_dir, onnx_path, opset=opset, with_past=with_past).to_dict()
    info.pop("path")
    if info["fallback"]:
        note(f"  {info['fallback']}: exported by torch.onnx, logits only (no KV cache)")
    else:
        info.pop("fallback")  # the manifest carries it only when it happened
    graphs = {"fp32": onnx_path}
    if fp16:
        note("converting to FP16")
        graphs["fp16"] = convert_fp16(onnx_path, fp16_path(onnx_path))
    quantization = None
    if quantize is not None and quantize.mode != "none":
        note(f"quantizing to {quantize.mode}")
        graphs[quantize.mode], quantization = _quantize(onnx_path, quantize)
    if target == "onnxruntime":
        info["attention_fusion"] = _fuse_for_ort([g for p, g in graphs.items() if p != "fp16"], note,
                                                 max_positions(student.config))
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
    return ExportResult(info, graphs, parity, audits, student.config, share, quantization)
