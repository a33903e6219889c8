"""Sparsity audit: prove that the export kept exactly the student's zeros, and report the n:m pattern they form.

The audit compares the exported graph with the *student*, not with the target pattern: a run that stopped before its
target (say 2:4 in 75 % of the groups) exports correctly when the graph holds the same 75 %; that the target was not
reached is the distillation's verdict, not an export failure.

Exporters rename and re-lay-out weights (``nn.Linear``'s [out, in] becomes a MatMul initializer [K, N], Gemm
may keep [N, K] with transB=1, an FP16 pass inserts Casts). So each pruned PyTorch weight is found by
*content* among the initializers, its consumer is traced through Transpose/Cast/Identity to the MatMul or
Gemm, the reduction axis is derived from that path, and the pattern is checked on the initializer's own data.

Quantized graphs are read back the same way: an INT8/FP8 weight behind DequantizeLinear (QDQ), an INT8 weight of
MatMulInteger (dynamic quantization; its scale is the quantizer's ``<name>_scale``) and MatMulNBits' packed 4-bit
blocks (unpacked) are dequantized for the content match (within one quantization step), and the zeros and n:m
groups are checked on the integer codes minus their zero point, which must be exactly zero where the student is.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SparseKDError

PASS_THROUGH = {"Cast", "Identity", "DequantizeLinear"}


class SparsityLostError(SparseKDError):
    exit_code = 1


@dataclass
class InitializerAudit:
    param: str
    initializer: str | None
    consumer: str | None
    reduction_axis: int | None
    holds: bool  # the export kept every zero of the student and at least the student's share of n:m groups
    detail: str = ""
    groups_holding: float | None = None  # share of m-groups along the reduction axis with at most n non-zeros
    student_groups_holding: float | None = None


def nm_group_share(arr: np.ndarray, axis: int, n: int, m: int) -> float:
    """Share of the m-wide groups along ``axis`` that hold at most ``n`` non-zeros (0.0 when m does not divide it)."""
    moved = np.moveaxis(arr, axis, -1)
    if moved.shape[-1] % m:
        return 0.0
    groups = moved.reshape(-1, m)
    return float(((groups != 0).sum(-1) <= n).mean())


def _reduction_axis(name: str, consumers: dict, ndim: int) -> tuple[str | None, int | None]:
    """Follow ``name`` to a MatMul/Gemm; return (consumer description, reduction axis in the initializer)."""
    axes = list(range(ndim))  # axes[i] = initializer axis that sits at position i after the path's transposes
    current = name
    for _ in range(8):
        nodes = consumers.get(current, [])
        if not nodes:
            return None, None
        node = nodes[0]
        if node.op_type in PASS_THROUGH:
            current = node.output[0]
            continue
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(reversed(range(ndim))))
            axes = [axes[p] for p in perm]
            current = node.output[0]
            continue
        if node.op_type in ("MatMul", "MatMulInteger"):
            if list(node.input).index(current) == 1:
                return f"MatMul {node.name}", axes[-2]  # B [K, N]: K reduces
            return f"MatMul {node.name} (as A)", axes[-1]
        if node.op_type == "Gemm":
            attrs = {a.name: a.i for a in node.attribute}
            pos = list(node.input).index(current)
            if pos == 1:
                return f"Gemm {node.name} transB={attrs.get('transB', 0)}", axes[1] if attrs.get("transB", 0) else axes[0]
            return f"Gemm {node.name} (as A)", axes[0] if attrs.get("transA", 0) else axes[1]
        return f"{node.op_type} {node.name}", None
    return None, None


@dataclass
class _View:
    """A 2-D weight as the graph stores it, read back to float; ``codes`` (quantized weights only) are the integer
    (or float8) codes minus the zero point: zero exactly where the stored weight is zero."""

    values: np.ndarray
    codes: np.ndarray | None = None
    step: np.ndarray | None = None  # one quantization step per element (the content-match tolerance)
    consumer: str | None = None  # known for fused ops (MatMulNBits); else traced from the graph
    axis: int | None = None
    encoding: str = ""
    saturated: np.ndarray | None = None  # codes at the format's largest magnitude: the weight may lie beyond them


def _along(v: np.ndarray, axis: int, shape: tuple, block: int = 0) -> np.ndarray:
    """A scale / zero point broadcast to ``shape``: a scalar, per channel on ``axis``, or per block along it."""
    v = np.asarray(v)
    if v.ndim == 0 or v.size == 1:
        return np.broadcast_to(v.reshape(()), shape)
    if block:
        return np.repeat(v, block, axis=axis).take(range(shape[axis]), axis=axis)
    return np.expand_dims(v, 1 - axis) if v.ndim == 1 else v


def _views(model) -> dict[str, _View]:
    """Every 2-D weight of the graph by the tensor name its consumer reads: float initializers as they are, quantized
    ones dequantized."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}

    def arr(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    views = {}
    for name, init in inits.items():
        if len(init.dims) == 2:
            a = numpy_helper.to_array(init)
            if a.dtype in (np.float16, np.float32, np.float64):
                views[name] = _View(a)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            x = arr(node.input[0])
            attrs = {a.name: a.i for a in node.attribute}
            axis, block = attrs.get("axis", 1) % 2, attrs.get("block_size", 0)
            scale = _along(arr(node.input[1]).astype(np.float32), axis, x.shape, block)
            zp = arr(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            zp = np.zeros((), np.float32) if zp is None else _along(zp.astype(np.float32), axis, x.shape, block)
            codes = x.astype(np.float32) - zp
            # float8 codes are floats: a step is relative (e4m3: 3 mantissa bits; 2^-9 the smallest subnormal).
            fp8 = "float8" in str(x.dtype)
            step = np.abs(scale) * (np.abs(codes) / 8 + 2.0**-9) if fp8 else np.abs(scale)
            # A float8 scale below amax / 448 (ORT's own, from a histogram's spread) clips the largest weights to
            # ±448 (e4m3fn's max); this tool's amax scales put the largest exactly there.
            views[node.output[0]] = _View(codes * scale, codes, step,
                                          encoding=f"{x.dtype} via DequantizeLinear (zero point {_zp(zp)})",
                                          saturated=np.abs(codes) >= 448 if fp8 else None)
        elif node.op_type == "MatMulInteger" and node.input[1] in inits:
            x = arr(node.input[1])
            base = node.input[1].removesuffix("_quantized")
            scale, zp = arr(base + "_scale"), arr(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if scale is None:
                continue  # not written by onnxruntime's quantizer: the weight stays unmatched and is reported
            zp = np.zeros((), np.float32) if zp is None else _along(zp.astype(np.float32), 1, x.shape)
            codes = x.astype(np.float32) - zp
            scale = _along(scale.astype(np.float32), 1, x.shape)
            views[node.input[1]] = _View(codes * scale, codes, np.abs(scale),
                                         encoding=f"{x.dtype} via MatMulInteger (zero point {_zp(zp)})")
        elif node.op_type == "MatMulNBits" and node.input[1] in inits:
            views[node.input[1]] = _nbits_view(node, arr)
    return views


def _zp(zp: np.ndarray) -> str:
    u = np.unique(zp)
    return f"{u[0]:g}" if u.size == 1 else f"{u.min():g}..{u.max():g}"


def _nbits_view(node, arr) -> _View:
    """MatMulNBits' B: uint8 [N, blocks, blob] holding ``bits``-wide codes, low bits first; default zero point
    2^(bits-1); one scale per block. Read back to [N, K] (the reduction axis is 1)."""
    attrs = {a.name: a.i for a in node.attribute}
    K, N, bits, bs = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    packed = arr(node.input[1]).reshape(N, -1)
    per_byte = 8 // bits
    codes = np.stack([(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], -1).reshape(N, -1)[:, :K]
    blocks = -(-K // bs)
    scale = np.repeat(arr(node.input[2]).astype(np.float32).reshape(N, blocks), bs, axis=1)[:, :K]
    zp_in = arr(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if zp_in is None:
        zp = np.full((N, K), 1 << (bits - 1), np.float32)
    else:
        rows = zp_in.reshape(N, -1)
        zp = np.stack([(rows >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], -1).reshape(N, -1)
        zp = np.repeat(zp[:, :blocks].astype(np.float32), bs, axis=1)[:, :K]
    c = codes.astype(np.float32) - zp
    return _View(c * scale, c, np.abs(scale), f"MatMulNBits {node.name}", 1,
                 f"{bits}-bit blocks of {bs} via MatMulNBits (zero point {_zp(zp)})")


def _matches(view: _View, ref: np.ndarray) -> bool:
    a = view.values.astype(np.float32)
    if view.codes is None:
        # fp16 graphs: values equal to fp16 precision (tiny weights may underflow to zero, never the reverse).
        return not np.any((a != 0) & (ref == 0)) and np.allclose(a, ref, rtol=1e-2, atol=1e-3)
    # Quantized: within one step of the student wherever the student is non-zero (rounding moves a weight by at most
    # half a step, clipping at the range's edge by one); its zeros are checked exactly afterwards, so a graph that
    # lost some is matched and reported with the count rather than as an unknown weight.
    close = (np.abs(a - ref) <= view.step * 1.001 + 1e-7) | (ref == 0)
    if view.saturated is not None:  # clipped: same sign, and the student's weight at least as large
        close |= view.saturated & (np.sign(a) == np.sign(ref)) & (np.abs(ref) >= np.abs(a) - view.step)
    return bool(np.all(close))


def audit_onnx(onnx_path: str | Path, pruned: dict[str, np.ndarray], n: int | None = 2, m: int | None = 4
               ) -> list[InitializerAudit]:
    """``pruned``: param name -> weight in [out, in] layout (reduction axis 1), as it was in PyTorch.
    With ``n``/``m`` None (unstructured sparsity) only the zeros are checked, no group pattern."""
    import onnx

    model = onnx.load(str(onnx_path))
    consumers = defaultdict(list)
    for node in model.graph.node:
        for x in node.input:
            consumers[x].append(node)
    views = _views(model)
    by_shape = defaultdict(list)
    for name, v in views.items():
        by_shape[v.values.shape].append(name)

    results = []
    for param, w in pruned.items():
        w32 = w.astype(np.float32)
        found = None
        for shape, layout in ((w.shape, "oi"), (w.shape[::-1], "io")):
            for name in by_shape.get(shape, []):
                if _matches(views[name], w32 if layout == "oi" else w32.T):
                    found = (name, layout)
                    break
            if found:
                break
        if not found:
            results.append(InitializerAudit(param, None, None, None, False, "no initializer with this weight's content"))
            continue
        name, layout = found
        view = views[name]
        consumer, axis = (view.consumer, view.axis) if view.axis is not None else _reduction_axis(name, consumers, 2)
        if axis is None:
            results.append(InitializerAudit(param, name, consumer, None, False, "consumer is not a MatMul/Gemm"))
            continue
        detail = f"initializer layout {layout}" + (f", {view.encoding}" if view.encoding else "")
        stored = view.values if view.codes is None else view.codes
        lost = 0
        if view.codes is not None:  # float initializers proved this in the content match
            ref = w32 if layout == "oi" else w32.T
            lost = int(np.count_nonzero((stored != 0) & (ref == 0)))
            if lost:
                detail += f"; {lost} zeros of the student are non-zero in the graph"
        if n is None:
            results.append(InitializerAudit(param, name, consumer, axis, not lost, detail))
            continue
        share = nm_group_share(stored, axis, n, m)
        student_share = nm_group_share(w32, 1, n, m)
        results.append(InitializerAudit(param, name, consumer, axis, not lost and share >= student_share, detail,
                                        share, student_share))
    return results


def student_pattern_share(results: list[InitializerAudit]) -> float | None:
    """Mean share of n:m groups the student holds over the audited weights (1.0 = the full pattern)."""
    shares = [r.student_groups_holding for r in results if r.student_groups_holding is not None]
    return sum(shares) / len(shares) if shares else None


def audit_report(results: list[InitializerAudit]) -> dict:
    return {
        "checked": len(results),
        "holding": sum(r.holds for r in results),
        "student_pattern_share": student_pattern_share(results),
        "initializers": [r.__dict__ for r in results],
    }


def require_pattern(results: list[InitializerAudit], where: str, n: int | None = 2, m: int | None = 4) -> None:
    lost = [r for r in results if not r.holds]
    if lost:
        def why(r):
            if r.detail and r.groups_holding is None:
                return r.detail
            zeros = r.detail.rpartition("; ")[2] if "non-zero in the graph" in r.detail else ""
            return (f"{r.groups_holding:.0%} of groups hold {n}:{m} in the graph, {r.student_groups_holding:.0%} in "
                    f"the student (axis {r.reduction_axis})" + (f"; {zeros}" if zeros else ""))

        first = "; ".join(f"{r.param} → {r.initializer or '?'} ({why(r)})" for r in lost[:3])
        what = f"{n}:{m} pattern" if n else "sparsity"
        raise SparsityLostError(f"{what} lost in {where}: the export changed the student's sparsity in "
                                f"{len(lost)} of {len(results)} pruned weights ({first})")


def zeroed_weights(model) -> dict[str, np.ndarray]:
    """Every prunable weight of a loaded student that holds zeros, [out, in] layout: what the export must keep.
    Read from the weights themselves, so no side file can disagree with the model being exported. A head tied to the
    embedding is left out: the pruner never prunes it (``core/pruner.py``), so its zeros (Gemma's padding row) are
    no pattern, and its initializer is the embedding's, read by a Gather first."""
    from ..models.adapters import embedding_tied, prunable_layers

    tied = embedding_tied(model)
    weights = {ly.name: ly.weight_oi().detach().float().numpy() for ly in prunable_layers(model, exclude=())
               if ly.name not in tied}
    return {name: w.copy() for name, w in weights.items() if not w.all()}


def pruned_weights(model_dir: str | Path, sparsity_json: dict) -> dict[str, np.ndarray]:
    """The pruned weights of a student dir, [out, in] layout, as named in its sparsity.json."""
    from ..models.adapters import prunable_layers
    from ..models.loading import load_model

    model = load_model(Path(model_dir))
    layers = {ly.name: ly for ly in prunable_layers(model, exclude=())}
    return {name: layers[name].weight_oi().detach().numpy().copy() for name in sparsity_json["layers"]}
