"""ORT's fused attention for the onnxruntime target: the exported SDPA subgraph becomes com.microsoft
MultiHeadAttention, logits and KV-cache decoding keep parity, left-padded rows stay finite, TensorRT graphs never
carry it, and bad input is one clear line."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from sparsekd_deploy.cli import main
from sparsekd_deploy.exporters.onnx import all_nodes
from sparsekd_deploy.exporters.ort_attention import FusionError, fuse_attention
from sparsekd_deploy.exporters.trt_precision import EnginePrecisionError, check_ort_contrib
from sparsekd_deploy.pipeline.parity import check_parity
from sparsekd_deploy.targets.base import TargetError
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget


def _ops(path):
    """(domain, op) of every node, those inside If / Loop bodies too."""
    return [(n.domain, n.op_type) for n in all_nodes(onnx.load(str(path), load_external_data=False).graph)]


# MultiHeadAttention nodes per fused layer: the query-block Loop's and the plain branch's of its If
# (exporters/ort_query_blocks.py).
MHA_PER_LAYER = 2


@pytest.fixture(scope="module")
def fused(exported, tmp_path_factory):
    """The tiny 2:4 llama (2 layers, 4 query heads over 2 KV heads) exported, and its fused copy."""
    model, path = exported["llama"]
    dst = tmp_path_factory.mktemp("fused") / "model.onnx"
    return path, dst, fuse_attention(path, dst, max_positions=model.config.max_position_embeddings)


def test_every_layer_fused_and_the_decomposed_attention_gone(fused):
    plain, dst, info = fused
    assert info.fused == 2 and info.op == "com.microsoft.MultiHeadAttention"
    ops = _ops(dst)
    assert ops.count(("com.microsoft", "MultiHeadAttention")) == 2 * MHA_PER_LAYER
    assert info.query_blocks == {"layers": 2, "block": 128, "from_queries": 256}
    assert not {("", "Softmax"), ("", "IsNaN")} & set(ops)
    assert {("", "Softmax"), ("", "IsNaN")} <= set(_ops(plain))  # what it replaced


def test_the_fused_graph_keeps_nothing_that_nothing_reads(fused):
    _, dst, _ = fused
    graph = onnx.load(str(dst), load_external_data=False).graph
    # If / Loop bodies read the outer graph's values by name
    read = {name for node in all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
    assert not [init.name for init in graph.initializer if init.name not in read]
    # the replaced subgraphs' constants (scales, -inf, the NaN guard's 0) went with them
    assert not [node.name for node in graph.node if not any(o in read for o in node.output)]


def test_fused_graph_keeps_fp32_parity_and_the_same_greedy_decode(fused, exported):
    plain, dst, _ = fused
    model, _ = exported["llama"]
    prompts = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    parity = check_parity(model, dst, prompts, "fp32")  # the project's fp32 tolerance: 1e-3 logit, 1e-5 KL
    assert parity["max_abs_logit_diff"] < 1e-4
    ids = prompts.numpy()[:, :6]
    want = OnnxRuntimeTarget(plain).generate(ids, 12).tokens
    got = OnnxRuntimeTarget(dst).generate(ids, 12).tokens  # KV cache: past/present through MultiHeadAttention
    np.testing.assert_array_equal(got, want)


def test_left_padded_rows_stay_finite_and_real_rows_match_pytorch(fused, exported):
    """A row with no visible key (left padding) must not turn into NaN and spread to the real rows (the mask's -inf
    is replaced by float32's minimum); the real positions match PyTorch with the same mask."""
    _, dst, _ = fused
    model, _ = exported["llama"]
    ids = np.random.default_rng(0).integers(0, 256, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :5] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    sess = OnnxRuntimeTarget(dst).session
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
    got = sess.run(["logits"], feed)[0]
    assert np.isfinite(got).all()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4)


def test_a_graph_without_the_pattern_is_left_alone(exported, tmp_path):
    """GPT-2's exported attention is another subgraph: nothing fused, the file not rewritten."""
    _, path = exported["gpt2"]
    copy = tmp_path / "gpt2.onnx"
    copy.write_bytes(path.read_bytes())
    assert fuse_attention(copy).fused == 0
    assert copy.read_bytes() == path.read_bytes()


def test_damaged_or_already_fused_graph_is_one_clear_line(fused, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(FusionError, match=r"cannot read .*bad.onnx as an ONNX graph"):
        fuse_attention(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.onnx.tmp").exists()
    _, dst, _ = fused
    with pytest.raises(FusionError, match="already holds MultiHeadAttention"):
        fuse_attention(dst, tmp_path / "again.onnx")


def test_tensorrt_refuses_a_fused_graph_naming_the_target(fused):
    plain, dst, _ = fused
    check_ort_contrib(plain)  # standard ONNX passes
    with pytest.raises(EnginePrecisionError, match=r"com.microsoft MultiHeadAttention.*--target tensorrt"):
        check_ort_contrib(dst)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt", None])
def test_export_fuses_only_the_onnxruntime_targets_graphs(target, pruned_dirs, tmp_path):
    """Fused only when --target onnxruntime is asked for: a plain export stays standard ONNX for any runtime."""
    out = tmp_path / "model.onnx"
    mode = "int4-weight" if target == "tensorrt" else "int8-dynamic"
    r = CliRunner().invoke(main, ["export", str(pruned_dirs["llama"]), "--out", str(out),
                                  *(["--target", target] if target else []), "--quantize", mode, "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    quantized = res["quantization"]["path"]
    mha = [_ops(p).count(("com.microsoft", "MultiHeadAttention")) for p in (out, quantized)]
    if target == "onnxruntime":
        assert mha == [2 * MHA_PER_LAYER] * 2
        fusion = res["export"]["attention_fusion"]
        assert (fusion["model.onnx"], fusion["model.int8-dynamic.onnx"]) == (2, 2)
        assert [fusion["query_blocks"][f]["layers"] for f in ("model.onnx", "model.int8-dynamic.onnx")] == [2, 2]
        assert res["parity"]["fp32"]["max_abs_logit_diff"] < 1e-3  # checked on the fused graph
    else:
        assert mha == [0, 0] and "attention_fusion" not in res["export"]
        assert not any(d == "com.microsoft" for p in (out, quantized) for d, _ in _ops(p))


def test_an_external_data_graph_is_not_rewritten_in_place(exported, tmp_path):
    """Over 1.8 GB the weights live in a data file beside the graph; fusing in place would write over the file it
    reads, so such a graph stays as it is and the record says why."""
    import onnx

    _, path = exported["llama"]
    model = onnx.load(str(path))
    dst = tmp_path / "big.onnx"
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location="big.onnx.data",
              size_threshold=0)
    before = dst.read_bytes(), (tmp_path / "big.onnx.data").read_bytes()
    info = fuse_attention(dst)
    assert info.fused == 0 and "external-data" in info.skipped
    assert (dst.read_bytes(), (tmp_path / "big.onnx.data").read_bytes()) == before
    from sparsekd_deploy.pipeline.export_step import _fuse_for_ort

    notes = []
    record = _fuse_for_ort([dst], notes.append)  # what the manifest's model.attention_fusion holds
    assert record["big.onnx"] == 0 and "external-data" in record["skipped"]["big.onnx"]
    assert any("left unfused" in n for n in notes)


def test_rotary_and_residual_norms_fused_by_orts_own_fusers_with_caches_cut_to_the_models_positions(fused, exported,
                                                                                                   tmp_path):
    """After the attention, ORT's fusers turn each layer's rotary (q and k) into RotaryEmbedding and each residual Add
    + RMSNorm into SkipSimplifiedLayerNormalization; their cos / sin caches (131072 positions by default) are cut to
    the model's max_position_embeddings (64 for the tiny llama). Parity and KV-cache decoding: the tests above run on
    this graph."""
    plain, dst, info = fused
    ops = _ops(dst)
    # 2 layers: q and k rotated in each; the first norm has no residual before it, the other 4 (2 per layer) do
    assert info.ort_fusions == {"RotaryEmbedding": 4, "SkipSimplifiedLayerNormalization": 4}
    assert ops.count(("com.microsoft", "RotaryEmbedding")) == 4
    assert ("", "Neg") in set(_ops(plain)) and ("", "Neg") not in set(ops)  # rotate_half's Neg went with the rotary
    graph = onnx.load(str(dst), load_external_data=False).graph
    caches = {i.name: list(i.dims) for i in graph.initializer if i.name in ("cos_cache", "sin_cache")}
    model, _ = exported["llama"]
    half = model.config.hidden_size // model.config.num_attention_heads // 2
    assert caches == {"cos_cache": [64, half], "sin_cache": [64, half]}
    assert "onnxruntime.transformers" in info.rewriter
    # without max_positions the fuser's own 131072 rows stay (what the export step avoids)
    uncut = fuse_attention(plain, tmp_path / "uncut.onnx", max_positions=None)
    assert uncut.ort_fusions == info.ort_fusions
    dims = [list(i.dims) for i in onnx.load(str(tmp_path / "uncut.onnx")).graph.initializer if i.name == "cos_cache"]
    assert dims == [[131072, half]]


def test_orts_fusers_failing_leave_the_attention_fused_graph_and_say_why(exported, tmp_path, monkeypatch):
    from onnxruntime.transformers import optimizer

    def broken(*_a, **_k):
        raise AttributeError("'NoneType' object has no attribute 'item'\nmore")

    monkeypatch.setattr(optimizer, "optimize_by_fusion", broken)
    _, path = exported["llama"]
    copy = tmp_path / "model.onnx"
    copy.write_bytes(path.read_bytes())
    info = fuse_attention(copy)
    assert (info.fused, info.ort_fusions) == (2, None)
    import onnxruntime

    assert info.ort_skipped == f"onnxruntime.transformers {onnxruntime.__version__} failed: 'NoneType' object has no " \
        "attribute 'item'"
    ops = _ops(copy)
    assert ops.count(("com.microsoft", "MultiHeadAttention")) == 2 * MHA_PER_LAYER
    assert ("com.microsoft", "RotaryEmbedding") not in ops
    assert not (tmp_path / "model.onnx.tmp").exists()


def test_a_rotary_fusion_that_moves_the_logits_is_not_kept_and_the_record_says_so(exported, tmp_path, monkeypatch):
    """ORT's fusers guess a graph's rotary layout; a wrong guess (here forced: every RotaryEmbedding told its halves
    are interleaved) runs but moves the logits. The export step keeps the attention-fused graph and records why."""
    from sparsekd_deploy.exporters import ort_attention
    from sparsekd_deploy.pipeline.export_step import _fuse_for_ort

    real = ort_attention.ort_fusions

    def wrong_layout(model, max_positions=None):
        counts = real(model, max_positions)
        for node in model.graph.node:
            if node.op_type == "RotaryEmbedding":
                next(a for a in node.attribute if a.name == "interleaved").i = 1
        return counts

    monkeypatch.setattr(ort_attention, "ort_fusions", wrong_layout)
    model, path = exported["llama"]
    copy = tmp_path / "model.onnx"
    copy.write_bytes(path.read_bytes())
    notes = []
    record = _fuse_for_ort([copy], notes.append, 64)
    assert record["model.onnx"] == 2 and "ort_fusions" not in record
    assert record["ort_fusions_skipped"]["model.onnx"].startswith("the graph onnxruntime.transformers")
    assert "moves the logits by" in record["ort_fusions_skipped"]["model.onnx"]
    assert any("rotary / norms left as exported" in n for n in notes)
    assert ("com.microsoft", "RotaryEmbedding") not in _ops(copy)
    prompts = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    assert check_parity(model, copy, prompts, "fp32")["max_abs_logit_diff"] < 1e-4


def test_gemmas_cache_length_positions_are_expanded_to_the_batch_for_orts_rotary(tmp_path):
    """Gemma's graph makes its positions from the cache length ([1, S], no position_ids input); ORT's rotary fuser
    hands that row to RotaryEmbedding, which refuses every batch over 1 (it used to be left unfused for that). Expanded
    to [batch, S] before the RotaryEmbedding nodes (exporters/ort_positions.py) the fused graph is kept: it matches
    PyTorch on 2 rows and decodes as the plain graph with its KV cache."""
    import onnx
    import transformers as tf
    from conftest import VOCAB

    torch.manual_seed(0)
    cfg = tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64, vocab_size=VOCAB)
    model = tf.GemmaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "gemma")
    from sparsekd_deploy.exporters.onnx import export_onnx

    plain, dst = tmp_path / "plain.onnx", tmp_path / "model.onnx"
    export_onnx(tmp_path / "gemma", plain)
    assert "position_ids" not in [i.name for i in onnx.load(str(plain)).graph.input]
    info = fuse_attention(plain, dst, max_positions=64)
    assert (info.fused, info.ort_skipped) == (2, None)
    # one [1, S] row (shared by the 4 RotaryEmbedding nodes of 2 layers' q and k) expanded once
    assert info.ort_fusions == {"RotaryEmbedding": 4, "SkipSimplifiedLayerNormalization": 4,
                                "position_rows_expanded": 1}
    ops = _ops(dst)
    assert ops.count(("com.microsoft", "RotaryEmbedding")) == 4 and ("", "Neg") not in set(ops)
    prompts = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    assert check_parity(model, dst, prompts, "fp32")["max_abs_logit_diff"] < 1e-4
    ids = prompts.numpy()[:, :6]
    fused_tokens = OnnxRuntimeTarget(dst).generate(ids, 12).tokens
    assert fused_tokens.shape == (2, 12)
    np.testing.assert_array_equal(fused_tokens, OnnxRuntimeTarget(plain).generate(ids, 12).tokens)


def test_a_fused_graph_refuses_positions_past_its_rotary_caches_in_one_line(fused):
    """RotaryEmbedding fails mid-run past its caches' rows (64 on the tiny llama); the target reads them from the
    graph, whoever opens it without a max_positions (parity, scripts), and refuses before running."""
    plain, dst, _ = fused
    prompt = np.arange(3, 63, dtype=np.int64)[None]  # 60 tokens: 60 + 8 new passes position 63
    target = OnnxRuntimeTarget(dst)
    assert target.max_positions == 64 and OnnxRuntimeTarget(plain).max_positions is None
    with pytest.raises(TargetError, match=r"^prompt \(60\) \+ 8 new tokens exceeds the model's 64 positions$"):
        target.generate(prompt, 8)
    assert target.generate(prompt, 4).tokens.shape == (1, 4)  # up to the last cached position it runs
    with pytest.raises(TargetError, match=r"^prompt of 65 tokens exceeds"):
        target.logits(np.ones((1, 65), np.int64))


def test_an_onnxruntime_run_failure_is_one_target_error_line(fused):
    plain, _, _ = fused
    target = OnnxRuntimeTarget(plain)
    # a cache of the wrong head size: onnxruntime's own error, as one line naming the file
    bad = {n: np.zeros((1, 2, 3, 5), np.float32) for n in target.past_names}
    with pytest.raises(TargetError, match=r"^onnxruntime failed running .*\.onnx: \S.*") as e:
        target._forward(np.ones((1, 1), np.int64), bad, 3)
    assert "\n" not in str(e.value)


def test_qwen2_with_qkv_biases_fuses_the_same_and_keeps_parity(tiny_dirs, tmp_path):
    from sparsekd_deploy.exporters.onnx import export_onnx
    from sparsekd_deploy.models.loading import load_model

    model, path = load_model(tiny_dirs["qwen2"]), tmp_path / "plain.onnx"
    export_onnx(tiny_dirs["qwen2"], path)
    dst = tmp_path / "model.onnx"
    info = fuse_attention(path, dst, max_positions=model.config.max_position_embeddings)
    assert (info.fused, info.ort_fusions) == (2, {"RotaryEmbedding": 4, "SkipSimplifiedLayerNormalization": 4})
    prompts = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    assert check_parity(model, dst, prompts, "fp32")["max_abs_logit_diff"] < 1e-4
    ids = prompts.numpy()[:, :6]
    np.testing.assert_array_equal(OnnxRuntimeTarget(dst).generate(ids, 12).tokens,
                                  OnnxRuntimeTarget(path).generate(ids, 12).tokens)


def test_the_records_rewriter_names_every_library_that_rewrote_any_file(exported, tmp_path):
    """The fp32 graph gets ORT's fusers, the tiny llama's int4-weight copy not even the attention rewrite: the record's
    one `rewriter` names both libraries (it named only the last file's)."""
    from sparsekd_deploy.exporters.quantize import quantize_onnx
    from sparsekd_deploy.pipeline.export_step import _fuse_for_ort

    _, path = exported["llama"]
    fp32, int4 = tmp_path / "model.onnx", tmp_path / "model.int4-weight.onnx"
    fp32.write_bytes(path.read_bytes())
    quantize_onnx(path, int4, "int4-weight")
    record = _fuse_for_ort([fp32, int4], lambda _msg: None, 64)
    assert (record["model.onnx"], record["model.int4-weight.onnx"]) == (2, 0)
    assert "onnxscript.rewriter" in record["rewriter"] and "onnxruntime.transformers" in record["rewriter"]


@pytest.mark.parametrize("value", ["abc", "0", "-5", ""])
def test_a_damaged_rotary_positions_metadata_is_one_target_error_line(fused, tmp_path, value):
    from sparsekd_deploy.exporters.ort_attention import POSITIONS_KEY

    _, dst, _ = fused
    model = onnx.load(str(dst))
    for prop in model.metadata_props:
        if prop.key == POSITIONS_KEY:
            prop.value = value
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(TargetError, match=rf"bad.onnx: its metadata {POSITIONS_KEY}='{value}' is not a positive"):
        OnnxRuntimeTarget(bad)


def test_an_external_data_graph_fused_to_another_file_keeps_its_blocks_and_is_written_whole(exported, tmp_path,
                                                                                             monkeypatch):
    """The > 1.8 GB path with the threshold lowered to 0 bytes: an external-data source fused to another file comes
    out blocked, in external data, giving the in-memory fused graph's logits; fusing again over that file rewrites
    its data file whole (onnx appends to a data file already there: it doubled at every save)."""
    import onnxruntime as ort

    import sparsekd_deploy.exporters.onnx as onnx_module

    _, path = exported["llama"]
    src = tmp_path / "src" / "big.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(path)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="big.onnx.data", size_threshold=0)
    small = tmp_path / "small.onnx"
    fuse_attention(path, small, max_positions=64, query_blocks=(4, 8))  # under the threshold: one file
    monkeypatch.setattr(onnx_module, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    sizes = []
    for _ in range(2):
        info = fuse_attention(src, out, max_positions=64, query_blocks=(4, 8))
        assert info.fused == 2 and info.query_blocks["layers"] == 2
        sizes.append((out.parent / "fused.onnx.data").stat().st_size)
    assert sizes[1] == sizes[0]
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]  # nothing left behind
    ids = np.random.default_rng(0).integers(3, 250, (2, 13))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(13), (2, 1))}
    want, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (small, out))
    for name in (i.name for i in want.get_inputs() if i.name.startswith("past_key_values.")):
        feed[name] = np.zeros((2, 2, 0, 8), np.float32)
    np.testing.assert_allclose(got.run(["logits"], feed)[0], want.run(["logits"], feed)[0], rtol=0, atol=1e-6)
    # Back under the threshold: one file, and the earlier save's data file does not stay behind as the graph's.
    monkeypatch.setattr(onnx_module, "EXTERNAL_DATA_BYTES", 1_800_000_000)
    fuse_attention(src, out, max_positions=64, query_blocks=(4, 8))
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx"]
