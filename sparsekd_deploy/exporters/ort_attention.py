"""Attention for ONNX Runtime: replace the exported graph's decomposed attention by ORT's fused
``com.microsoft.MultiHeadAttention`` (a CPU and a CUDA kernel), for graphs that only ONNX Runtime runs.

optimum's export of torch SDPA leaves, per layer, ``MatMul(q * s, Transpose(k) * s) + bias -> Softmax ->
Where(IsNaN(p), 0, p) -> MatMul(p, v) -> Transpose -> Reshape``: five full passes over a [batch, heads, seq, seq]
tensor (16 x 512 x 512 floats per layer on the issue-13 Llama), identical in an fp32 and an int8 graph — at 512
tokens about a third of the int8 prefill (README, quantization). MultiHeadAttention does the same per head inside
one kernel. ORT's own fusers do not take this graph: ``onnxruntime.transformers.optimizer`` matches its own
exporter's attention, and onnxscript's SDPA rule wants a scalar NaN-guard constant and known query shapes (this
graph has a [1]-shaped 0 and unknown ones). So the rewrite is one rule of onnxscript's pattern rewriter (the engine
those fusions use), matched against the whole subgraph and checked before it is replaced.

The additive mask ``Where(mask, 0, -inf)`` becomes ``Where(mask, 0, float32 min)``: a query row with no key to
attend to (left padding) gives NaN in a softmax over -inf, which torch's exported NaN guard turned into 0 and
MultiHeadAttention would spread to every later row; with the finite minimum such a row averages the values
instead (what transformers' eager attention does), and a row with any visible key is unchanged (exp(min - max)
is 0 in float32).

TensorRT cannot parse com.microsoft ops, so callers fuse only graphs made for the onnxruntime target; the
TensorRT graphs (and any QDQ graph for them) stay standard ONNX.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import SparseKDError, first_line
from .onnx import ORT_DOMAIN as DOMAIN
from .ort_positions import expand_rotary_positions
from .ort_query_blocks import MIN_QUERIES, QUERY_BLOCK, block_queries


class FusionError(SparseKDError):
    pass


@dataclass
class FusionInfo:
    fused: int  # attention subgraphs replaced
    op: str = f"{DOMAIN}.MultiHeadAttention"
    rewriter: str = ""  # the library that did it, with its version
    skipped: str | None = None  # why the graph was not rewritten at all
    ort_fusions: dict | None = None  # ORT's own fusers' counts (RotaryEmbedding, SkipSimplifiedLayerNormalization)
    ort_skipped: str | None = None  # why ORT's fusers' graph was not kept (the attention-only graph was written)
    query_blocks: dict | None = None  # layers whose prompt attention runs in query blocks (``ort_query_blocks.py``)

    def to_dict(self) -> dict:
        return asdict(self)


def _scalar(value) -> float | None:
    """The one number a constant value holds (a [1]-shaped tensor counts), else None."""
    from onnxscript import ir

    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None:
        return None
    arr = tensor.numpy()
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _rule():
    from onnxscript.rewriter import pattern

    class DecomposedSDPAToMHA(pattern.RewriteRuleClassBase):
        """The SDPA subgraph, from the rotated query [B, H, S, Dh] and the present key / value [B, H, T, Dh], to the
        [B, S, H*Dh] the output projection reads."""

        def pattern(self, op, query, key, value, mask, zero, neg_inf, q_scale, k_scale, nan_zero, out_shape):
            scores = op.MatMul(op.Mul(query, q_scale), op.Mul(op.Transpose(key, perm=[0, 1, 3, 2]), k_scale))
            probs = op.Softmax(op.Add(scores, op.Where(mask, zero, neg_inf)), axis=-1)
            probs = op.Where(op.IsNaN(probs), nan_zero, probs)
            out = op.Transpose(op.MatMul(probs, value), perm=[0, 2, 1, 3])
            return op.Reshape(out, out_shape)

        def check(self, context, query, key, value, zero, neg_inf, q_scale, k_scale, nan_zero, **_):
            result = pattern.MatchResult()
            consts = {"zero": _scalar(zero), "neg_inf": _scalar(neg_inf), "q_scale": _scalar(q_scale),
                      "k_scale": _scalar(k_scale), "nan_zero": _scalar(nan_zero)}
            missing = [k for k, v in consts.items() if v is None]
            if missing:
                return result.fail(f"not constant scalars: {', '.join(missing)}")
            if consts["zero"] != 0.0 or consts["nan_zero"] != 0.0 or consts["neg_inf"] != -math.inf:
                return result.fail("the mask is not Where(mask, 0, -inf) or the NaN guard does not write 0")
            shapes = [v.shape for v in (query, key, value)]
            if any(s is None or len(s) != 4 for s in shapes):
                return result.fail("query, key and value are not known to be 4-D [batch, heads, seq, head]")
            heads, head_size = key.shape[1], key.shape[3]
            if not isinstance(heads, int) or not isinstance(head_size, int):
                return result.fail("the key's head count and head size are not static")
            q_heads, q_size = query.shape[1], query.shape[3]
            # MultiHeadAttention takes one head count for all three. The exporter leaves the query's head count
            # symbolic (its reshape has a -1); the key's and value's are static (repeat_kv made them the query's).
            if value.shape[1] != heads or (isinstance(q_heads, int) and q_heads != heads) or \
                    (isinstance(q_size, int) and q_size != head_size):
                return result.fail("the query's or the value's heads or head size differ from the key's")
            self._heads, self._scale = heads, consts["q_scale"] * consts["k_scale"]
            return result

        def rewrite(self, op, query, key, value, mask, zero, **_):
            from onnxscript import ir

            # Constants as `value` tensors: ORT's symbolic shape inference (which its later fusions need) reads only
            # that form and fails on value_ints / value_float.
            q = op.Reshape(op.Transpose(query, perm=[0, 2, 1, 3]),
                           op.Constant(value=ir.tensor(np.array([0, 0, -1], np.int64))))
            floor = op.Constant(value=ir.tensor(np.array(np.finfo(np.float32).min, np.float32)))
            bias = op.Where(mask, zero, floor)
            # key / value go in as [B, H, T, Dh] (MultiHeadAttention's BNSH form): no copy back to [B, T, H*Dh].
            return op.MultiHeadAttention(q, key, value, None, None, bias, num_heads=self._heads, scale=self._scale,
                                         _domain=DOMAIN)

    return pattern.RewriteRuleSet([DecomposedSDPAToMHA.rule()])


ORT_FUSIONS = {"RotaryEmbedding": "rotary", "SkipSimplifiedLayerNormalization": "residual Add + RMSNorm"}
# The count of computed [1, S] position rows expanded to [batch, S] for RotaryEmbedding (``ort_positions.py``).
POSITIONS_EXPANDED = "position_rows_expanded"


def ort_fusions(model, max_positions: int | None = None) -> dict[str, int]:
    """ORT's own fusers (``onnxruntime.transformers``) on ``model`` in place, only those that match these graphs:
    each layer's rotary (Mul / Slice / Neg / Concat / Add on q and k) becomes one RotaryEmbedding, and each residual
    Add before an RMSNorm joins it in a SkipSimplifiedLayerNormalization. Returns the count of each op made.

    Why: with the attention fused, these small kernels are most of what is left besides the weight MatMuls — time
    quantization cannot take away, so they weigh on the int8 / fp32 ratio and on decode, where each token runs every
    one of them. Everything else (attention, gelu, embedding fusions) is off: the attention is ours, and ORT's gelu
    fuser fails on the quantized graphs.

    A graph without a ``position_ids`` input (Gemma's) hands RotaryEmbedding a computed [1, S] row, which it refuses
    for a batch over 1: ``expand_rotary_positions`` expands it to [batch, S] (counted as ``position_rows_expanded``).

    The rotary fuser writes cos / sin caches of 131072 positions (its default for any model, 33 MB at head size
    64); ``max_positions`` (the model's ``max_position_embeddings``) cuts them to the positions the model has."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    from .quantize import quiet_ort

    options = FusionOptions("bert")
    for name in vars(options):
        if name.startswith("enable_"):
            setattr(options, name, False)
    # layer_norm: the skip fuser joins an Add to a SimplifiedLayerNormalization, which this makes of the RMSNorm first
    # (ORT's session would at load anyway); shape inference: it tells the residual input from the skip input.
    for name in ("rotary_embeddings", "layer_norm", "skip_layer_norm", "shape_inference"):
        setattr(options, f"enable_{name}", True)
    with quiet_ort():  # "symbolic shape inference failed" on graphs it cannot type (Cohere's), logged and printed
        optimized = optimize_by_fusion(model, "bert", optimization_options=options).model
    counts = {op: sum(n.op_type == op and n.domain == DOMAIN for n in optimized.graph.node) for op in ORT_FUSIONS}
    expanded = expand_rotary_positions(optimized)  # Gemma's [1, S] positions: RotaryEmbedding wants [batch, S]
    if expanded:
        counts[POSITIONS_EXPANDED] = expanded
    if max_positions:
        _cut_rotary_caches(optimized, max_positions)
    model.CopyFrom(optimized)
    return counts


def _cut_rotary_caches(model, rows: int) -> None:
    from onnx import numpy_helper

    caches = {n.input[i] for n in model.graph.node if n.op_type == "RotaryEmbedding" for i in (2, 3)}
    for init in model.graph.initializer:
        if init.name in caches and init.dims and init.dims[0] > rows:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:rows].copy(), init.name))


# The key under which a fused graph names the positions its rotary caches hold: RotaryEmbedding refuses a position
# past them with an onnxruntime error, so the onnxruntime target reads this and refuses such a prompt in one line.
POSITIONS_KEY = "sparsekd.rotary_positions"


def rotary_positions(model) -> int | None:
    """Rows of the RotaryEmbedding caches of ``model`` (the positions it can run), None without one."""
    caches = {n.input[2] for n in model.graph.node if n.op_type == "RotaryEmbedding" and n.domain == DOMAIN}
    rows = [init.dims[0] for init in model.graph.initializer if init.name in caches and init.dims]
    return min(rows) if rows else None


# A fused graph is kept when its logits are the attention-only graph's within this (relative to the largest logit):
# the kernels reorder float sums (~1e-6 measured on the tiny families), a mis-handled rotary moves them by O(1).
PROBE_TOLERANCE = 1e-3


def _probe(model_bytes: bytes) -> list:
    """Logits of a 2-row, 5-token prompt and of one cached decode step after it (the paths users run): two rows, as a
    graph whose positions lost their batch axis only fails with more than one."""
    import onnxruntime as ort

    from .decoder_feeds import CACHE_PREFIX, session_caches, step_feed

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failing run is reported by the caller, in one line
    session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    caches = session_caches(inputs)
    outputs = [o.name for o in session.get_outputs()]
    ids = np.array([[1, 5, 9, 3, 7], [4, 2, 8, 6, 1]], np.int64)
    past, seen, results = None, 0, []
    for step in (ids, ids[:, -1:]):
        named = dict(zip(outputs, session.run(None, step_feed(step, seen, inputs, caches, past)), strict=True))
        results.append(named["logits"].astype(np.float32))
        if not caches:
            break  # no cache: the prompt pass is all there is
        past = {n: named[n.replace(CACHE_PREFIX, "present.")] for n in caches}
        seen += step.shape[1]
    return results


def _kept_ort_fusions(model, max_positions: int | None, fusers: str) -> tuple[dict | None, str | None]:
    """ORT's fusers on a copy of ``model``, kept (``model`` becomes the copy) only when it runs and gives the
    attention-only graph's logits (``_probe``); else ``model`` stays as it is. Returns (counts, None) when kept,
    (None, why) when not. Why a check at all: the fusers match by pattern and guess the rest — on Gemma's graph
    (positions made from the cache length, [1, S]) their RotaryEmbedding refused any batch over 1 until
    ``ort_positions`` expanded those positions; a layout they guess wrong would run and move the logits."""
    import onnx

    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    try:
        counts = ort_fusions(fused, max_positions)
    except Exception as e:  # their own failure on a graph they do not expect
        return None, f"{fusers} failed: {first_line(e)}"
    rows = rotary_positions(fused)
    if rows:
        fused.metadata_props.add(key=POSITIONS_KEY, value=str(rows))
    try:
        want = _probe(model.SerializeToString())
    except Exception as e:
        raise FusionError(f"onnxruntime cannot run the attention-fused graph: {first_line(e)}") from None
    try:
        got = _probe(fused.SerializeToString())
    except Exception as e:
        return None, f"onnxruntime cannot run the graph {fusers} made: {first_line(e)}"
    for a, b in zip(want, got, strict=True):
        diff = float(np.abs(a - b).max())
        if not diff <= PROBE_TOLERANCE * max(1.0, float(np.abs(a).max())):
            return None, f"the graph {fusers} made moves the logits by {diff:.3g}"
    model.CopyFrom(fused)
    return counts, None


def fuse_attention_model(model) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place; returns how many attention subgraphs were fused."""
    from onnxscript import ir
    from onnxscript.ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

    ir_model = ir.from_proto(model)
    # The exporter writes no intermediate shapes; the rule needs the query's rank and the key's head count.
    ShapeInferencePass()(ir_model)
    count = _rule().apply_to_model(ir_model)
    if count:
        # The replaced subgraphs' constants (the -inf, the split scales, the NaN guard's 0) are read by nothing now;
        # left in, ORT logs a "Removing initializer" warning for each at every session start.
        RemoveUnusedNodesPass()(ir_model)
        ir_model.graph.opset_imports.setdefault(DOMAIN, 1)
        proto = ir.to_proto(ir_model)
        model.CopyFrom(proto)
    return count


def fuse_attention(src: str | Path, dst: str | Path | None = None, *, max_positions: int | None = None,
                   query_blocks: tuple[int, int] | None = (QUERY_BLOCK, MIN_QUERIES)) -> FusionInfo:
    """Fuse ``src``'s attention into MultiHeadAttention, then its rotary and residual norms with ORT's own fusers
    (``ort_fusions``; ``max_positions`` sizes the rotary caches), and write it to ``dst`` (default: over ``src``;
    temp name, then rename: never half-written). A graph with no matching attention is left as it was (fused 0, ORT's
    fusers not run either): not rewritten in place, copied unchanged to another ``dst``. When ORT's fusers fail or
    their graph does not run as the attention-fused one does, that one is written and ``ort_skipped`` says why.
    ``query_blocks`` = (block, from how many queries) for ``ort_query_blocks.block_queries``; None: not blocked."""
    import onnx
    import onnxruntime
    import onnxscript

    from .onnx import EXTERNAL_DATA_BYTES, all_nodes, save_onnx

    src = Path(src)
    dst = Path(dst) if dst is not None else src
    rewriter = f"onnxscript.rewriter {onnxscript.__version__}"

    def unreadable(e: Exception) -> FusionError:  # onnx raises DecodeError / OSError / its own types
        return FusionError(f"cannot read {src} as an ONNX graph: {first_line(e)}")

    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as e:
        raise unreadable(e) from None
    if any(n.domain == DOMAIN and n.op_type == "MultiHeadAttention" for n in all_nodes(model.graph)):
        raise FusionError(f"{src.name} already holds MultiHeadAttention nodes (fused before); fuse the exported graph")
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        if dst == src:
            # Rewriting in place would write the new weights over the data file the graph is read from: a crash
            # midway would leave neither graph. Such graphs (> 1.8 GB) stay unfused, and the record says why.
            return FusionInfo(0, rewriter=rewriter, skipped="external-data graph (> 1.8 GB): not rewritten in place")
        try:
            onnx.load_external_data_for_model(model, str(src.parent))
        except Exception as e:
            raise unreadable(e) from None
    try:
        count = fuse_attention_model(model)
    except Exception as e:  # the rewriter's own failure on a graph it does not expect: one line, the graph untouched
        raise FusionError(f"fusing the attention of {src.name} failed in {rewriter}: {first_line(e)}") from None
    if count == 0 and dst == src:
        return FusionInfo(0, rewriter=rewriter)  # nothing to rewrite
    counts = why = blocks = None
    if count:  # only graphs whose attention we recognised (the decoder layouts ORT's fusers were written for)
        ort_fusers = f"onnxruntime.transformers {onnxruntime.__version__}"
        counts, why = _kept_ort_fusions(model, max_positions, ort_fusers)
        if counts is not None:
            rewriter = f"{rewriter}; {ort_fusers}"
        # Last, and with no probe: it rewrites only our own nodes, into the same kernel on slices of the same
        # tensors (tests/test_ort_query_blocks.py holds prompts, cached decoding and left padding to the unblocked
        # graph's logits; sums regrouped move them <= 6e-7 on the tiny models of scripts/check_ort_fusions.py).
        if query_blocks is not None:
            block, least = query_blocks
            blocks = {"layers": block_queries(model, block, least), "block": block, "from_queries": least}
    size = sum(init.ByteSize() for init in model.graph.initializer)
    save_onnx(model, dst, size > EXTERNAL_DATA_BYTES)
    return FusionInfo(count, rewriter=rewriter, ort_fusions=counts, ort_skipped=why,
                      query_blocks=blocks)
