import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sparsekd_deploy.exporters.audit import SparsityLostError, audit_onnx, pruned_weights, require_pattern
from sparsekd_deploy.exporters.fp16 import convert_fp16
from sparsekd_deploy.exporters.onnx import export_onnx
from sparsekd_deploy.pipeline.parity import ParityError, check_parity


def _sparsity(student_dir):
    return json.loads((student_dir.parent / "sparsity.json").read_text())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_pruned_initializer_keeps_2of4(family, pruned_dirs, exported):
    model, path = exported[family]
    weights = pruned_weights(pruned_dirs[family], _sparsity(pruned_dirs[family]))
    results = audit_onnx(path, weights)
    assert len(results) == len(weights) > 0
    assert all(r.holds and r.initializer for r in results), [r for r in results if not r.holds]
    require_pattern(results, "model.onnx")
    # optimum lays nn.Linear out as MatMul [K, N]: the reduction axis is 0 there
    assert {r.reduction_axis for r in results} == {0}


def test_parity_fp32_on_real_prompts(exported):
    model, path = exported["llama"]
    res = check_parity(model, path, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert res["max_abs_logit_diff"] <= 1e-4 and res["kl"] <= 1e-6


def test_parity_error_carries_numbers(exported):
    model, path = exported["llama"]
    with pytest.raises(ParityError, match=r"max \|Δlogit\| .* \(allowed 1e-12\)"):
        check_parity(model, path, torch.randint(0, 256, (1, 8)), tolerance=(1e-12, 1e-12))


def test_fp16_copy_keeps_pattern_and_parity(pruned_dirs, exported, tmp_path):
    model, path = exported["llama"]
    half = convert_fp16(path, tmp_path / "m.fp16.onnx")
    types = {i.data_type for i in onnx.load(str(half)).graph.initializer if len(i.dims) == 2}
    assert TensorProto.FLOAT16 in types
    weights = pruned_weights(pruned_dirs["llama"], _sparsity(pruned_dirs["llama"]))
    assert all(r.holds for r in audit_onnx(half, weights))
    res = check_parity(model, half, torch.randint(0, 256, (2, 16)), "fp16")
    assert res["max_abs_logit_diff"] > 0  # really ran in half precision


def test_audit_fails_loudly_when_pattern_is_lost(pruned_dirs, exported, tmp_path):
    _, path = exported["llama"]
    weights = pruned_weights(pruned_dirs["llama"], _sparsity(pruned_dirs["llama"]))
    m = onnx.load(str(path))
    name, w = next(iter(weights.items()))
    for init in m.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.shape == w.T.shape and np.allclose(arr, w.T):
            arr = arr.copy()
            arr[arr == 0] = 0.5  # densify this layer
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(m, str(broken))
    results = audit_onnx(broken, weights)
    assert sum(not r.holds for r in results) == 1
    with pytest.raises(SparsityLostError, match="2:4 pattern lost in broken.onnx: the export changed the student's sparsity in 1 of"):
        require_pattern(results, "broken.onnx")


def _graph(op, w, attrs=None, transpose=None):
    nodes, b = [], "W"
    if transpose is not None:
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"], perm=transpose))
        b = "Wt"
    nodes.append(helper.make_node(op, ["X", b], ["Y"], **(attrs or {})))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, None])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None])],
                          [numpy_helper.from_array(w, "W")])
    return helper.make_model(g)


@pytest.mark.parametrize("layout", ["matmul_kn", "gemm_transb", "transpose_then_matmul"])
def test_reduction_axis_per_layout(layout, tmp_path):
    rng = np.random.default_rng(0)
    w_oi = rng.normal(size=(8, 16)).astype(np.float32)  # [out, in]
    w_oi.reshape(-1, 4)[:, :2] = 0  # 2:4 along in
    if layout == "matmul_kn":
        model, expect_axis = _graph("MatMul", w_oi.T.copy()), 0
    elif layout == "gemm_transb":
        model, expect_axis = _graph("Gemm", w_oi, {"transB": 1}), 1
    else:
        model, expect_axis = _graph("MatMul", w_oi, transpose=[1, 0]), 1
    p = tmp_path / f"{layout}.onnx"
    onnx.save(model, str(p))
    (r,) = audit_onnx(p, {"layer.weight": w_oi})
    assert r.reduction_axis == expect_axis and r.holds


def test_partial_pattern_exported_faithfully_is_not_a_lost_pattern(tmp_path):
    """A run that stopped early holds 2:4 in some groups only: an export that keeps exactly those zeros passes the
    audit and reports the share; the same export with one more group densified fails it."""
    rng = np.random.default_rng(0)
    w_oi = rng.normal(size=(8, 16)).astype(np.float32)
    w_oi.reshape(-1, 4)[:24, :2] = 0  # 24 of 32 groups pruned to 2:4: a stage short of the target
    p = tmp_path / "partial.onnx"
    onnx.save(_graph("MatMul", w_oi.T.copy()), str(p))
    (r,) = audit_onnx(p, {"layer.weight": w_oi})
    assert r.holds and r.groups_holding == pytest.approx(0.75) and r.student_groups_holding == pytest.approx(0.75)
    require_pattern([r], "partial.onnx")

    exported = w_oi.T.copy()
    exported[0:2, 0] = 0.5  # the first pruned group of output row 0 is dense again in the graph
    onnx.save(_graph("MatMul", exported), str(p))
    (r,) = audit_onnx(p, {"layer.weight": w_oi})
    assert not r.holds
    with pytest.raises(SparsityLostError, match="changed the student's sparsity in 1 of 1"):
        require_pattern([r], "partial.onnx")


def test_torch_onnx_fallback_without_kv_cache(pruned_dirs, tmp_path):
    info = export_onnx(pruned_dirs["gpt2"], tmp_path / "m.onnx", exporter="torch")
    assert info.exporter == "torch.onnx" and not info.with_past
    from sparsekd_deploy.models.loading import load_model
    from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget

    model = load_model(pruned_dirs["gpt2"])
    res = check_parity(model, tmp_path / "m.onnx", torch.randint(0, 256, (2, 10)))
    assert res["max_abs_logit_diff"] <= 1e-4
    t = OnnxRuntimeTarget(tmp_path / "m.onnx")
    assert not t.has_kv_cache
    ids = np.random.default_rng(1).integers(0, 256, (2, 5))
    hf = model.generate(torch.from_numpy(ids), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=5,
                        do_sample=False, pad_token_id=0)[:, 5:].numpy()
    np.testing.assert_array_equal(t.generate(ids, 5).tokens, hf)


def test_export_restores_the_callers_warning_filters_and_logger_levels(pruned_dirs, tmp_path):
    import logging
    import warnings

    logging.getLogger("transformers.modeling_utils").setLevel(logging.INFO)
    filters = list(warnings.filters)
    export_onnx(pruned_dirs["llama"], tmp_path / "m.onnx")
    assert warnings.filters == filters
    assert logging.getLogger("transformers.modeling_utils").level == logging.INFO


def _gqa_phi(root):
    """A Phi (phi-2 layout) with fewer key / value heads than query heads: optimum's export sizes its dummy cache by
    the query heads and fails inside the model (no released Phi-1/1.5/2 is shaped so; the case stands for any
    architecture optimum knows but fails on)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, vocab_size=256)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "phi", safe_serialization=True)
    return root / "phi"


def test_optimum_failing_on_a_model_falls_back_to_torch_onnx_and_says_why(tmp_path):
    """It raised optimum's RuntimeError as a traceback; now torch.onnx exports it (logits only), the record says why,
    and --json's stdout stays one JSON document (torch.onnx's progress lines went there)."""
    from click.testing import CliRunner

    from sparsekd_deploy.cli import main
    from sparsekd_deploy.models.loading import load_model

    model_dir = _gqa_phi(tmp_path)
    r = CliRunner().invoke(main, ["export", str(model_dir), "--out", str(tmp_path / "m.onnx"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)["export"]
    assert (info["exporter"], info["with_past"]) == ("torch.onnx", False)
    assert info["fallback"] == ("optimum could not export it (RuntimeError: Sizes of tensors must match except in "
                                "dimension 2. Expected size 4 but got size 2 for tensor number 1 in the list.)")
    res = check_parity(load_model(model_dir), tmp_path / "m.onnx", torch.randint(0, 256, (2, 10)))
    assert res["max_abs_logit_diff"] <= 1e-4


def test_both_exporters_failing_is_one_line_naming_both(pruned_dirs, tmp_path, monkeypatch):
    from sparsekd_deploy.exporters import onnx as onnx_export

    def optimum_fails(*_a):
        raise RuntimeError("optimum broke\nsecond line")

    def torch_fails(*_a):
        raise TypeError("torch broke")

    monkeypatch.setattr(onnx_export, "_optimum", optimum_fails)
    monkeypatch.setattr(onnx_export, "_torch_onnx_export", torch_fails)
    with pytest.raises(onnx_export.ExportError) as e:
        export_onnx(pruned_dirs["llama"], tmp_path / "m.onnx")
    assert str(e.value) == (f"cannot export {pruned_dirs['llama']} to ONNX: optimum could not export it (RuntimeError: "
                            "optimum broke); torch.onnx failed too (TypeError: torch broke)")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_plain_export_records_no_fallback(exported, pruned_dirs, tmp_path):
    info = export_onnx(pruned_dirs["llama"], tmp_path / "m.onnx")
    assert (info.exporter, info.with_past, info.fallback) == ("optimum", True, None)
