"""Positions for ORT's RotaryEmbedding: one row per batch row.

Some exports have no ``position_ids`` input: Gemma's graph makes its positions from the cache length,
``Unsqueeze(Range(past, past + S))`` = one [1, S] row that the decomposed rotary broadcasts over the batch.
ORT's rotary fuser hands that row to RotaryEmbedding as its ``position_ids``, and RotaryEmbedding wants
[batch, S] (or a [1] offset): it refuses any batch over 1. Expanding the row to [batch, S] before the
RotaryEmbedding nodes gives each batch row the positions the broadcast gave it, so the fused graph computes what
the exported one does (``ort_attention._kept_ort_fusions`` still checks that on a 2-row prompt and a cached step).
"""

from __future__ import annotations

from .onnx import ORT_DOMAIN

PREFIX = "sparsekd_rotary_positions"


def _rank2(model, names: set[str]) -> set[str]:
    """Those of ``names`` that onnx's shape inference types as 2-D (the [1, S] row; a [1] offset is left alone)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # an untyped graph: nothing is known to be 2-D, nothing is rewritten
        return set()
    typed = list(inferred.graph.value_info) + list(inferred.graph.input)
    return {v.name for v in typed if v.name in names and v.type.tensor_type.HasField("shape")
            and len(v.type.tensor_type.shape.dim) == 2}


def expand_rotary_positions(model) -> int:
    """In ``model`` (a ModelProto, after ORT's fusers) give every com.microsoft RotaryEmbedding whose ``position_ids``
    is a computed 2-D tensor (not the graph's own input, which is [batch, S] already) that tensor expanded to
    [batch of its input, S]. Returns how many distinct position tensors were expanded."""
    import numpy as np
    from onnx import NodeProto, helper, numpy_helper

    graph = model.graph
    inputs = {i.name for i in graph.input}

    def is_rotary(n) -> bool:
        return n.op_type == "RotaryEmbedding" and n.domain == ORT_DOMAIN and len(n.input) > 1

    computed = {n.input[1] for n in graph.node if is_rotary(n) and n.input[1] and n.input[1] not in inputs}
    targets = _rank2(model, computed)
    if not targets:
        return 0
    for name, value in ((f"{PREFIX}_0", [0]), (f"{PREFIX}_1", [1])):
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    expanded: dict[str, str] = {}
    out = []
    for old in graph.node:
        node = NodeProto()
        node.CopyFrom(old)
        pos = node.input[1] if is_rotary(node) else None
        if pos in targets and pos not in expanded:
            # Inserted just before the first RotaryEmbedding reading it: its input x and the positions exist there.
            tag = f"{PREFIX}/{len(expanded)}"
            x = node.input[0]
            out += [
                helper.make_node("Shape", [x], [f"{tag}/x_shape"], name=f"{tag}/ShapeX"),
                helper.make_node("Gather", [f"{tag}/x_shape", f"{PREFIX}_0"], [f"{tag}/batch"], name=f"{tag}/Batch",
                                 axis=0),
                helper.make_node("Shape", [pos], [f"{tag}/pos_shape"], name=f"{tag}/ShapePos"),
                helper.make_node("Gather", [f"{tag}/pos_shape", f"{PREFIX}_1"], [f"{tag}/seq"], name=f"{tag}/Seq",
                                 axis=0),
                helper.make_node("Concat", [f"{tag}/batch", f"{tag}/seq"], [f"{tag}/shape"], name=f"{tag}/Shape",
                                 axis=0),
                helper.make_node("Expand", [pos, f"{tag}/shape"], [f"{tag}/position_ids"], name=f"{tag}/Expand"),
            ]
            expanded[pos] = f"{tag}/position_ids"
        if pos in expanded:
            node.input[1] = expanded[pos]
        out.append(node)
    del graph.node[:]
    graph.node.extend(out)
    return len(expanded)
