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
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, past + new), np.int64)
    mask[0, :left_pad] = 0
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
    # values of the keys its block can see instead of all of them: its own output only, read by no real position.
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


def test_the_products_own_blocks_on_a_prompt_longer_than_the_minimum(tmp_path):
    """Defaults (blocks of 128 from 256 queries on) on a 2-layer llama with 320 positions: a 300-token prompt (three
    blocks, the last of 44) and cached decoding after it keep the unblocked graph's logits and tokens."""
    import transformers as tf

    from sparsekd_deploy.exporters.onnx import export_onnx

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=320, vocab_size=256)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m", safe_serialization=True)
    export_onnx(tmp_path / "m", tmp_path / "exported.onnx")
    plain, blocked = tmp_path / "plain.onnx", tmp_path / "blocked.onnx"
    fuse_attention(tmp_path / "exported.onnx", plain, max_positions=320, query_blocks=None)
    assert fuse_attention(tmp_path / "exported.onnx", blocked, max_positions=320).query_blocks == {
        "layers": 2, "block": 128, "from_queries": 256}
    a, b = _session(plain), _session(blocked)
    feed, _ = _feed(a, 2, 0, 300, 0, seed=3)
    np.testing.assert_allclose(b.run(["logits"], feed)[0], a.run(["logits"], feed)[0], rtol=0, atol=1e-5)
    ids = feed["input_ids"][:, :290]
    np.testing.assert_array_equal(OnnxRuntimeTarget(blocked).generate(ids, 8).tokens,
                                  OnnxRuntimeTarget(plain).generate(ids, 8).tokens)
