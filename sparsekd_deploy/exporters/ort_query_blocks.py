"""Causal attention in blocks of queries, for ONNX Runtime's CPU MultiHeadAttention kernel.

A causal mask hides half of the [queries x keys] scores, and ORT's CPU MultiHeadAttention still computes all of them
whenever it is given a mask or a bias (only its unmasked, non-causal path is a flash kernel). Cut the prompt's queries
into blocks of ``QUERY_BLOCK`` and let block i attend only to the keys up to its own last query (the cache's keys
included): the same kernel on the same numbers, minus the hidden upper-right blocks, on score tiles that stay in
cache. It relies on the bias being causal — no query sees a key past its own position — which holds for the only
graphs it is given: causal-LM exports whose attention ``ort_attention`` rewrote. Measured on the issue-13 Llama's
shape (16 heads of 64, fp32, 2 threads; ``scripts/bench_ort_attention.py``): one layer's 512-token prompt
10.4 -> 6.6 ms, 2048 tokens 172 -> 65 ms, outputs equal. Every row with a key to attend to still sees exactly the
keys it saw: the block's rows of the additive bias (causal + padding) are sliced with it. A left-padded query sees
no key and averages the values of those its block holds instead of all of them: its own output only, which no real
position's attention reads — but an int8-dynamic graph's activation scales are per tensor, so there it moves the real
rows as much as changing the padded tokens' ids does (0.098 vs 0.097 max |Δlogit|, a 320-position tiny llama, 3 rows
padded 0 / 7 / 130 before a 300-token prompt); fp32, static int8 and int4-weight graphs are unaffected.

Per MultiHeadAttention node the rewrite is ``If(queries >= MIN_QUERIES)``: then a ``Loop`` over the blocks (each
block's output appended to a sequence, concatenated along the sequence axis), else the original node. Decode steps
and short prompts take the plain node: the Loop costs ~0.3 ms per call, more than it saves below a few hundred
queries. The kernel takes only a bias with one row per query (ORT refuses a row broadcast over the queries), so the
bias's rows can always be sliced with the queries.

Only ever applied to the onnxruntime target's graphs (``ort_attention.fuse_attention``), after quantization. The
sequence and the If's outputs are typed float32: FP16 copies are never fused (their attention is not rewritten).
"""

from __future__ import annotations

import numpy as np

from .onnx import ORT_DOMAIN as DOMAIN

QUERY_BLOCK = 128
MIN_QUERIES = 256


def _is_ours(node) -> bool:
    """Our rewrite's node: query [B, S, H*Dh], key / value [B, N, T, Dh], no key-padding mask, a [B, 1, S, T] bias,
    one output (no past / present inside the kernel: the graph concatenates the cache itself)."""
    ins = list(node.input)
    return (node.domain == DOMAIN and node.op_type == "MultiHeadAttention" and len(ins) == 6
            and all(ins[i] for i in (0, 1, 2, 5)) and not ins[3] and not ins[4] and len(node.output) == 1)


def _blocked(node, block: int, min_queries: int) -> list:
    """The nodes that replace ``node``: the If choosing between the block Loop and ``node`` itself."""
    from onnx import TensorProto, helper, numpy_helper

    q, k, v, _, _, bias = node.input
    p = f"{node.output[0]}/query_blocks/"  # every value name in an ONNX model (subgraphs too) must be unique

    def const(name, value, dtype=np.int64):
        return helper.make_node("Constant", [], [p + name], value=numpy_helper.from_array(np.array(value, dtype)))

    def op(kind, inputs, output, **attrs):
        return helper.make_node(kind, [i if i in (q, k, v, bias, "") else p + i for i in inputs], [p + output], **attrs)

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def mha(inputs, output):
        return helper.make_node("MultiHeadAttention", inputs, [p + output], domain=DOMAIN, **attrs)

    body = helper.make_graph([
        op("Mul", ["i", "block"], "start"), op("Add", ["start", "block"], "end"),  # Slice clips the last block at S
        op("Add", ["end", "past"], "keys"),  # this block's last query sees the cache and every query up to itself
        const("axis0", [0]), op("Unsqueeze", ["start", "axis0"], "start1"), op("Unsqueeze", ["end", "axis0"], "end1"),
        op("Unsqueeze", ["keys", "axis0"], "keys1"), const("zero1", [0]), const("seq_axis", [1]),
        const("key_axis", [2]), const("bias_axes", [2, 3]),
        op("Slice", [q, "start1", "end1", "seq_axis"], "q_block"),
        op("Slice", [k, "zero1", "keys1", "key_axis"], "k_block"),
        op("Slice", [v, "zero1", "keys1", "key_axis"], "v_block"),
        op("Concat", ["start1", "zero1"], "bias_start", axis=0), op("Concat", ["end1", "keys1"], "bias_end", axis=0),
        op("Slice", [bias, "bias_start", "bias_end", "bias_axes"], "bias_block"),
        mha([p + "q_block", p + "k_block", p + "v_block", "", "", p + "bias_block"], "out_block"),
        op("SequenceInsert", ["blocks_in", "out_block"], "blocks_out"),
        op("Identity", ["go_in"], "go_out"),
    ], "query_block", [helper.make_tensor_value_info(p + "i", TensorProto.INT64, []),
                       helper.make_tensor_value_info(p + "go_in", TensorProto.BOOL, []),
                       helper.make_tensor_sequence_value_info(p + "blocks_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(p + "go_out", TensorProto.BOOL, []),
         helper.make_tensor_sequence_value_info(p + "blocks_out", TensorProto.FLOAT, None)])
    then_branch = helper.make_graph([
        const("block_minus_1", block - 1), op("Add", ["S", "block_minus_1"], "S_up"),
        op("Div", ["S_up", "block"], "n_blocks"),  # ceil(S / block)
        helper.make_node("Constant", [], [p + "true"], value=numpy_helper.from_array(np.array(True))),
        op("SequenceEmpty", [], "blocks0", dtype=TensorProto.FLOAT),
        op("Loop", ["n_blocks", "true", "blocks0"], "blocks", body=body),
        op("ConcatFromSequence", ["blocks"], "out_blocked", axis=1),
    ], "blocked", [], [helper.make_tensor_value_info(p + "out_blocked", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([mha(list(node.input), "out_plain")], "plain", [],
                                    [helper.make_tensor_value_info(p + "out_plain", TensorProto.FLOAT, None)])
    return [
        op("Shape", [q], "S1", start=1, end=2), op("Shape", [k], "T1", start=2, end=3),
        const("S_axis", [0]), op("Squeeze", ["S1", "S_axis"], "S"), op("Squeeze", ["T1", "S_axis"], "T"),
        op("Sub", ["T", "S"], "past"), const("block", block), const("min_queries", [min_queries]),
        op("GreaterOrEqual", ["S1", "min_queries"], "blocked1"), op("Squeeze", ["blocked1", "S_axis"], "blocked"),
        helper.make_node("If", [p + "blocked"], list(node.output), then_branch=then_branch, else_branch=else_branch),
    ]


def block_queries(model, block: int = QUERY_BLOCK, min_queries: int = MIN_QUERIES) -> int:
    """Rewrite each of ``model``'s (an ``onnx.ModelProto``) MultiHeadAttention nodes in place as above; returns how
    many. A graph the rewrite ran on before holds no top-level MultiHeadAttention node left to match: 0."""
    if block < 1 or min_queries < 1:
        raise ValueError(f"query blocks need a block and a minimum of at least 1 (got {block}, {min_queries})")
    graph = model.graph
    targets = {i for i, n in enumerate(graph.node) if _is_ours(n)}
    if not targets:
        return 0
    if not any(o.domain in ("", "ai.onnx") and o.version >= 11 for o in model.opset_import):
        raise ValueError("query blocks need the default opset >= 11 (sequences, Loop)")
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(_blocked(node, block, min_queries) if i in targets else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    return len(targets)

