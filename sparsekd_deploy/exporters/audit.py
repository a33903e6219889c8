"""Sparsity audit: prove that the export kept exactly the student's zeros, and report the n:m pattern they form.

The audit compares the exported graph with the *student*, not with the target pattern: a run that stopped before its
target (say 2:4 in 75 % of the groups) exports correctly when the graph holds the same 75 %; that the target was not
reached is the distillation's verdict, not an export failure.

Exporters rename and re-lay-out weights (``nn.Linear``'s [out, in] becomes a MatMul initializer [K, N], Gemm
may keep [N, K] with transB=1, an FP16 pass inserts Casts). So each pruned PyTorch weight is found by
*content* among the initializers, its consumer is traced through Transpose/Cast/Identity to the MatMul or
Gemm, the reduction axis is derived from that path, and the pattern is checked on the initializer's own data.
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
        if node.op_type == "MatMul":
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


def audit_onnx(onnx_path: str | Path, pruned: dict[str, np.ndarray], n: int | None = 2, m: int | None = 4
               ) -> list[InitializerAudit]:
    """``pruned``: param name -> weight in [out, in] layout (reduction axis 1), as it was in PyTorch.
    With ``n``/``m`` None (unstructured sparsity) only the zeros are checked, no group pattern."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    consumers = defaultdict(list)
    for node in model.graph.node:
        for x in node.input:
            consumers[x].append(node)
    by_shape = defaultdict(list)
    arrays = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2:
            arrays[init.name] = arr
            by_shape[arr.shape].append(init.name)

    results = []
    for param, w in pruned.items():
        w32 = w.astype(np.float32)
        found = None
        for shape, layout in ((w.shape, "oi"), (w.shape[::-1], "io")):
            for name in by_shape.get(shape, []):
                a = arrays[name].astype(np.float32)
                ref = w32 if layout == "oi" else w32.T
                # fp16 graphs: values equal to fp16 precision (tiny weights may underflow to zero, never the reverse).
                if not np.any((a != 0) & (ref == 0)) and np.allclose(a, ref, rtol=1e-2, atol=1e-3):
                    found = (name, layout)
                    break
            if found:
                break
        if not found:
            results.append(InitializerAudit(param, None, None, None, False, "no initializer with this weight's content"))
            continue
        name, layout = found
        consumer, axis = _reduction_axis(name, consumers, 2)
        if axis is None:
            results.append(InitializerAudit(param, name, consumer, None, False, "consumer is not a MatMul/Gemm"))
            continue
        # The content match above already proved that every student zero is zero in the graph; here the groups.
        if n is None:
            results.append(InitializerAudit(param, name, consumer, axis, True, f"initializer layout {layout}"))
            continue
        share = nm_group_share(arrays[name], axis, n, m)
        student_share = nm_group_share(w32, 1, n, m)
        results.append(InitializerAudit(param, name, consumer, axis, share >= student_share,
                                        f"initializer layout {layout}", share, student_share))
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
            return (f"{r.groups_holding:.0%} of groups hold {n}:{m} in the graph, {r.student_groups_holding:.0%} in "
                    f"the student (axis {r.reduction_axis})")

        first = "; ".join(f"{r.param} → {r.initializer or '?'} ({why(r)})" for r in lost[:3])
        what = f"{n}:{m} pattern" if n else "sparsity"
        raise SparsityLostError(f"{what} lost in {where}: the export changed the student's sparsity in "
                                f"{len(lost)} of {len(results)} pruned weights ({first})")


def zeroed_weights(model) -> dict[str, np.ndarray]:
    """Every prunable weight of a loaded student that holds zeros, [out, in] layout: what the export must keep.
    Read from the weights themselves, so no side file can disagree with the model being exported."""
    from ..models.adapters import prunable_layers

    weights = {ly.name: ly.weight_oi().detach().float().numpy() for ly in prunable_layers(model, exclude=())}
    return {name: w.copy() for name, w in weights.items() if not w.all()}


def pruned_weights(model_dir: str | Path, sparsity_json: dict) -> dict[str, np.ndarray]:
    """The pruned weights of a student dir, [out, in] layout, as named in its sparsity.json."""
    from ..models.adapters import prunable_layers
    from ..models.loading import load_model

    model = load_model(Path(model_dir))
    layers = {ly.name: ly for ly in prunable_layers(model, exclude=())}
    return {name: layers[name].weight_oi().detach().numpy().copy() for name in sparsity_json["layers"]}
