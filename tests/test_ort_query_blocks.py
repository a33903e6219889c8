"""Prompt attention in blocks of queries (exporters/ort_query_blocks.py): the blocked graph gives the unblocked
graph's logits for prompts with and without a cache, left padding, cached greedy decoding, and at the product's own
block size."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sparsekd_deploy.exporters.onnx import all_nodes
from sparsekd_deploy.exporters.ort_attention import fuse_attention
from sparsekd_deploy.exporters.ort_query_blocks import block_queries
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget

SMALL = (4, 8)  # blocks of 4 queries from 8 queries on: the tiny model's 64 positions hold several blocks


@pytest.fixture(scope="module")
def graphs(exported, tmp_path_factory):
    """The tiny llama's fused graph without query blocks, and with small ones."""
    model, path = exported["llama"]
    root = tmp_path_factory.mktemp("blocks")
    plain, blocked = root / "plain.onnx", root / "blocked.onnx"
    positions = model.config.max_position_embeddings
    assert fuse_attention(path, plain, max_positions=positions, query_blocks=None).query_blocks is None
    info = fuse_attention(path, blocked, max_positions=positions, query_blocks=SMALL)
    assert info.query_blocks == {"layers": 2, "block": 4, "from_queries": 8}
    return plain, blocked


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feed(session, rows, past, new, left_pad, seed):
    """Random ids and cache; ``left_pad``: row 0's left padding, or one per row."""
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, past + new), np.int64)
    for row, pad in enumerate(left_pad if isinstance(left_pad, tuple) else (left_pad,)):
        mask[row, :pad] = 0
    feed = {"input_ids": rng.integers(3, 250, (rows, new)), "attention_mask": mask,
            "position_ids": np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, past:]}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = rng.standard_normal((rows, i.shape[1], past, i.shape[3])).astype(np.float32)
    return feed, mask[:, past:].astype(bool)


@pytest.mark.parametrize("rows,past,new,left_pad", [
    (2, 0, 8, 0),  # exactly the minimum: two full blocks
    (2, 0, 13, 0),  # a last block of one query
    (1, 0, 30, 0),  # many blocks
    (2, 5, 11, 0),  # a cache before the prompt: each block also sees every cached key
    (2, 6, 9, 4),  # left padding inside the cache
    (2, 0, 14, 5),  # left padding inside the prompt: padded queries see no key
    (2, 3, 7, 0),  # below the minimum: the plain branch
    (2, 9, 1, 2),  # a decode step
])
def test_blocked_graph_gives_the_unblocked_logits(graphs, rows, past, new, left_pad):
    plain, blocked = (_session(p) for p in graphs)
    feed, real = _feed(plain, rows, past, new, left_pad, seed=new + past)
    names = [o.name for o in plain.get_outputs()]
    want = dict(zip(names, plain.run(None, feed), strict=True))
    got = dict(zip(names, blocked.run(None, feed), strict=True))
    assert np.isfinite(got["logits"]).all()
    # Real positions exactly as unblocked (up to regrouped sums). A padded query, which sees no key, averages the
    # values of the keys its block can see instead of all of them: its own output only, read by no real position's
    # attention (in this fp32 graph; an int8-dynamic graph's per-tensor activation scales do read it: the module's
    # docstring).
    np.testing.assert_allclose(got["logits"][real], want["logits"][real], rtol=0, atol=1e-5)
    for name in names:
        if name.startswith("present.") and left_pad <= past:  # a padded query's K / V come from its own state
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5)


def test_cached_greedy_decode_after_a_blocked_prompt_is_the_same(graphs):
    plain, blocked = graphs
    ids = torch.randint(3, 250, (2, 21), generator=torch.Generator().manual_seed(7)).numpy()
    np.testing.assert_array_equal(OnnxRuntimeTarget(blocked).generate(ids, 10).tokens,
                                  OnnxRuntimeTarget(plain).generate(ids, 10).tokens)


def test_every_fused_layer_is_an_if_with_the_blocked_loop_and_the_plain_node(graphs):
    plain, blocked = (onnx.load(str(p)) for p in graphs)
    top = [n.op_type for n in blocked.graph.node]
    assert top.count("If") == 2 and "MultiHeadAttention" not in top
    assert [n.op_type for n in plain.graph.node].count("MultiHeadAttention") == 2
    inner = [n.op_type for n in all_nodes(blocked.graph)]
    assert inner.count("Loop") == 2 and inner.count("MultiHeadAttention") == 4


def _one_node_graph(seq: int, heads: int, size: int) -> onnx.ModelProto:
    from onnx import TensorProto as T
    from onnx import helper

    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], ["out"], domain="com.microsoft",
                            num_heads=heads)
    graph = helper.make_graph(
        [node], "mha", [helper.make_tensor_value_info("q", T.FLOAT, [1, seq, heads * size]),
                        helper.make_tensor_value_info("k", T.FLOAT, [1, heads, seq, size]),
                        helper.make_tensor_value_info("v", T.FLOAT, [1, heads, seq, size]),
                        helper.make_tensor_value_info("bias", T.FLOAT, [1, 1, seq, seq])],
        [helper.make_tensor_value_info("out", T.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_blocking_twice_or_with_no_block_is_refused_or_a_no_op(graphs):
    _, blocked = graphs
    model = onnx.load(str(blocked))
    assert block_queries(model) == 0  # its MultiHeadAttention nodes now live inside the Ifs
    with pytest.raises(ValueError, match="at least 1"):
        block_queries(_one_node_graph(4, 1, 4), 0, 8)


@pytest.fixture(scope="module")
def long_graphs(tmp_path_factory):
    """A 2-layer llama with 320 positions fused without query blocks and with the product's own (blocks of 128
    from 256 queries on)."""
    import transformers as tf

    from sparsekd_deploy.exporters.onnx import export_onnx

    root = tmp_path_factory.mktemp("long")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=320, vocab_size=256)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "m", safe_serialization=True)
    export_onnx(root / "m", root / "exported.onnx")
    plain, blocked = root / "plain.onnx", root / "blocked.onnx"
    fuse_attention(root / "exported.onnx", plain, max_positions=320, query_blocks=None)
    assert fuse_attention(root / "exported.onnx", blocked, max_positions=320).query_blocks == {
        "layers": 2, "block": 128, "from_queries": 256}
    return plain, blocked


def test_the_products_own_blocks_on_a_prompt_longer_than_the_minimum(long_graphs):
    """A 300-token prompt (three blocks, the last of 44) and cached decoding after it keep the unblocked graph's
    logits and tokens."""
    plain, blocked = long_graphs
    a, b = _session(plain), _session(blocked)
    feed, _ = _feed(a, 2, 0, 300, 0, seed=3)
    np.testing.assert_allclose(b.run(["logits"], feed)[0], a.run(["logits"], feed)[0], rtol=0, atol=1e-5)
    ids = feed["input_ids"][:, :290]
    np.testing.assert_array_equal(OnnxRuntimeTarget(blocked).generate(ids, 8).tokens,
                                  OnnxRuntimeTarget(plain).generate(ids, 8).tokens)


@pytest.mark.parametrize("rows,past,new,left_pad", [
    (2, 0, 255, 0),  # one query under the minimum: the plain branch
    (2, 0, 256, 0),  # exactly the minimum: two full blocks
    (2, 0, 257, 0),  # a last block of one query
    (2, 63, 257, 0),  # a cache before it, 320 positions in all
    (3, 0, 300, (0, 7, 130)),  # each row padded differently, one past the first block's end
    (3, 10, 260, (0, 3, 140)),  # the same with a cache: padding inside it and past it
    (3, 0, 256, (0, 200, 255)),  # a row with one real token
])
def test_the_products_own_blocks_at_the_minimum_and_with_rows_padded_differently(long_graphs, rows, past, new,
                                                                                  left_pad):
    plain, blocked = (_session(p) for p in long_graphs)
    feed, real = _feed(plain, rows, past, new, left_pad, seed=new + past)
    want, got = (s.run(["logits"], feed)[0] for s in (plain, blocked))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-5)


def test_a_prompt_and_cache_past_the_positions_is_still_refused_in_one_line(long_graphs):
    from sparsekd_deploy.targets.base import TargetError

    ids = np.arange(3, 303, dtype=np.int64)[None] % 250
    with pytest.raises(TargetError, match=r"prompt \(300\) \+ 30 new tokens exceeds the model's 320 positions"):
        OnnxRuntimeTarget(long_graphs[1]).generate(ids, 30)


@pytest.mark.parametrize("new,loops", [(255, 0), (256, 2), (1, 0)])
def test_the_loop_runs_from_the_minimum_on_and_not_below(long_graphs, tmp_path, new, loops):
    """Which branch ran, from ORT's own profile: each layer's Loop from 256 queries on, none below."""
    import json

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(long_graphs[1]), so, providers=["CPUExecutionProvider"])
    feed, _ = _feed(session, 1, 300 - new if new == 1 else 0, new, 0, seed=1)
    session.run(["logits"], feed)
    trace = json.loads(open(session.end_profiling()).read())
    ran = [e for e in trace if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "Loop"
           and e["name"].endswith("_kernel_time")]
    assert len(ran) == loops
