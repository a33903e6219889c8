"""Quantized copies of the exported graph: the student's 2:4 zeros survive in the integer codes (and the audit fails
when they do not), the quantizer's settings per mode and target, bad input, and the build / validate / inspect path."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import FAST, LOOSE, VOCAB
from onnx import TensorProto, helper, numpy_helper

from sparsekd_deploy.cli import main
from sparsekd_deploy.exporters.audit import SparsityLostError, audit_onnx, pruned_weights, require_pattern
from sparsekd_deploy.exporters.quantize import ACT_MATMUL, QuantizeError, check_mode, quantize_onnx
from sparsekd_deploy.numerics import kl, log_softmax
from sparsekd_deploy.pipeline.export_step import calibration_feeds
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget

CASES = [("int8-dynamic", "onnxruntime"), ("int8", "onnxruntime"), ("int8", "tensorrt"),
         ("int4-weight", "onnxruntime"), ("int4-weight", "tensorrt"), ("fp8", "tensorrt")]
# What each quantizer stores a pruned weight as, and the zero point it uses (symmetric: a zero stays exactly zero).
ENCODING = {("int8-dynamic", "onnxruntime"): "int8 via MatMulInteger (zero point 0)",
            ("int8", "onnxruntime"): "int8 via DequantizeLinear (zero point 0)",
            ("int8", "tensorrt"): "int8 via DequantizeLinear (zero point 0)",
            ("int4-weight", "onnxruntime"): "4-bit blocks of 32 via MatMulNBits (zero point 8)",
            ("int4-weight", "tensorrt"): "int4 via DequantizeLinear (zero point 0)",
            ("fp8", "tensorrt"): "float8_e4m3fn via DequantizeLinear (zero point 0)"}


def _sparsity(student_dir):
    return json.loads((student_dir.parent / "sparsity.json").read_text())


def _ids(n, length=16, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, length))


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    """Every (mode, target) copy of the tiny llama's 2:4 graph, calibrated on seeded token ids."""
    _, path = exported["llama"]
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for mode, target in CASES:
        dst = root / f"{mode}-{target}.onnx"
        info = quantize_onnx(path, dst, mode, target=target, calibration=calibration_feeds(path, _ids(8)))
        out[mode, target] = (dst, info)
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_quantized_graph_keeps_every_zero_and_2of4(case, quantized, pruned_dirs):
    path, info = quantized[case]
    weights = pruned_weights(pruned_dirs["llama"], _sparsity(pruned_dirs["llama"]))
    results = audit_onnx(path, weights)
    assert len(results) == len(weights) > 0
    assert all(r.holds and r.groups_holding == 1.0 for r in results), [r for r in results if not r.holds]
    assert all(ENCODING[case] in r.detail for r in results), results[0].detail
    require_pattern(results, path.name)
    assert info.skipped == []


# KL(fp32 graph ‖ quantized graph) per position on 4 seeded prompts of the tiny llama (onnxruntime 1.32), as measured
# when written; within 2x either way, so a quantizer that silently got worse, or stopped quantizing, is caught.
# Static modes re-measured when they stopped quantizing attention MatMuls and node outputs (int8 1.75e-4 -> 1.29e-4
# onnxruntime, 1.64e-4 -> 1.01e-4 tensorrt, fp8 4.03e-3 -> 1.67e-3). fp8 re-measured when its scales became amax / 448
# (ORT's own, from the spread, gave 1.67e-3): 5.73e-4.
FP8_SPREAD_KL = 1.67e-3
GOLDEN_KL = {("int8-dynamic", "onnxruntime"): 6.2e-5, ("int8", "onnxruntime"): 1.29e-4, ("int8", "tensorrt"): 1.01e-4,
             ("int4-weight", "onnxruntime"): 2.64e-3, ("int4-weight", "tensorrt"): 2.19e-3, ("fp8", "tensorrt"): 5.73e-4}


def _kl_to_fp32(path, exported):
    ids = _ids(4, 12, seed=1)
    ref = OnnxRuntimeTarget(exported["llama"][1]).logits(ids)
    got = OnnxRuntimeTarget(path).logits(ids)
    return float(kl(log_softmax(ref), log_softmax(got)).mean())


@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_quantized_graph_runs_close_to_fp32(case, quantized, exported):
    d = _kl_to_fp32(quantized[case][0], exported)
    assert GOLDEN_KL[case] / 2 <= d <= 2 * GOLDEN_KL[case], d


def test_fp8_scales_are_amax_not_the_spread(quantized, exported):
    """fp8's scales map each tensor's amax onto e4m3fn's 448: every weight's largest code is exactly ±448 (nothing
    clipped, the range used), the manifest says amax, and the graph is at least 2.5x closer to fp32 than with ORT's
    own float8 scales (from the histogram's spread; 1.67e-3 here, which clipped the largest weights)."""
    path, info = quantized["fp8", "tensorrt"]
    assert info.calibration["method"] == "amax" and "amax / 448" in info.weights and "amax / 448" in info.activations
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    weights = [numpy_helper.to_array(inits[n.input[0]]).astype(np.float32) for n in graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) == 15 and all(np.abs(w).max() == 448 for w in weights)
    assert _kl_to_fp32(path, exported) <= FP8_SPREAD_KL / 2.5


@pytest.mark.parametrize("case", [("int8", "onnxruntime"), ("int8", "tensorrt"), ("fp8", "tensorrt")],
                         ids=["int8-ort", "int8-trt", "fp8-trt"])
def test_static_modes_quantize_weight_bearing_inputs_only(case, quantized):
    """Q/DQ only where a layer has a weight, on its inputs: no attention (activation x activation) MatMul reads a
    DequantizeLinear, no quantized node's output goes to a QuantizeLinear; the manifest names what stayed float."""
    path, info = quantized[case]
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    weighted = [n for n in graph.node if n.op_type == "MatMul" and producer.get(n.input[1]) == "DequantizeLinear"
                and any(x in inits for x in next(p for p in graph.node if n.input[1] in p.output).input)]
    plain = [n for n in graph.node if n.op_type == "MatMul" and n not in weighted]
    assert len(weighted) == 7 * 2 + 1  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    assert plain and all(producer.get(x) != "DequantizeLinear" for n in plain for x in n.input)
    consumers = {x: n.op_type for n in graph.node for x in n.input}
    assert not [n.name for n in weighted if consumers.get(n.output[0]) == "QuantizeLinear"]
    assert sorted(info.kept_float[ACT_MATMUL]) == sorted(n.name for n in plain)


def _weight_bytes(path):
    return sum(i.ByteSize() for i in onnx.load(str(path)).graph.initializer)


def test_quantized_weights_are_smaller(quantized, exported):
    """Initializer bytes (a tiny graph's file is mostly structure): int8 ~0.29x, int4 blocks ~0.16x of fp32."""
    fp32 = _weight_bytes(exported["llama"][1])
    ratio = {case: _weight_bytes(p) / fp32 for case, (p, _) in quantized.items()}
    assert ratio["int8-dynamic", "onnxruntime"] < 0.3 and ratio["int4-weight", "onnxruntime"] < 0.17, ratio


def _break_one_zero(path, result, w_oi, out):
    """Write a copy of ``path`` in which one pruned weight of ``result``'s layer is a non-zero code."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    o, i = map(int, np.argwhere(w_oi == 0)[0])
    node = next((n for n in m.graph.node if result.initializer in n.output), None)
    name = node.input[0] if node is not None and node.op_type == "DequantizeLinear" else result.initializer
    arr = numpy_helper.to_array(inits[name]).copy()
    if arr.ndim == 3:  # MatMulNBits [N, blocks, blob], low nibble first; code 8 is zero
        bs = 32
        byte = arr[o, i // bs, (i % bs) // 2]
        shift = 4 * (i % 2)
        arr[o, i // bs, (i % bs) // 2] = (byte & ~np.uint8(0xF << shift)) | np.uint8(9 << shift)
    else:  # [K, N] int8 codes, zero point 0
        arr[i, o] = 3
    inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(m, str(out))
    return out


@pytest.mark.parametrize("case", [("int8-dynamic", "onnxruntime"), ("int8", "tensorrt"), ("int4-weight", "onnxruntime")],
                         ids=["int8-dynamic", "int8-qdq", "int4-matmulnbits"])
def test_audit_fails_on_a_quantized_graph_whose_2of4_was_broken(case, quantized, pruned_dirs, tmp_path):
    path, _ = quantized[case]
    weights = pruned_weights(pruned_dirs["llama"], _sparsity(pruned_dirs["llama"]))
    victim = next(iter(weights))
    result = next(r for r in audit_onnx(path, weights) if r.param == victim)
    broken = _break_one_zero(path, result, weights[victim], tmp_path / "broken.onnx")
    results = audit_onnx(broken, weights)
    lost = [r for r in results if not r.holds]
    assert [r.param for r in lost] == [victim]
    assert "1 zeros of the student are non-zero in the graph" in lost[0].detail
    with pytest.raises(SparsityLostError, match=f"2:4 pattern lost in broken.onnx: .*1 of {len(weights)} pruned "
                                                f"weights \\({victim} → "):
        require_pattern(results, "broken.onnx")


def test_int4_skips_a_layer_whose_in_features_are_not_a_block_multiple(tmp_path):
    rng = np.random.default_rng(0)
    w48, w64 = rng.normal(size=(48, 8)).astype(np.float32), rng.normal(size=(64, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X48", "W48"], ["Y48"], name="odd"),
             helper.make_node("MatMul", ["X64", "W64"], ["Y64"], name="even")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X48", TensorProto.FLOAT, [1, 48]),
                                       helper.make_tensor_value_info("X64", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("Y48", TensorProto.FLOAT, [1, 8]),
                           helper.make_tensor_value_info("Y64", TensorProto.FLOAT, [1, 8])],
                          [numpy_helper.from_array(w48, "W48"), numpy_helper.from_array(w64, "W64")])
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    info = quantize_onnx(src, tmp_path / "g.int4.onnx", "int4-weight")
    assert info.skipped == ["odd: in-features 48 are not a multiple of the block size 32; left fp32"]
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "g.int4.onnx")).graph.node}
    assert ops["odd"] == "MatMul" and "MatMulNBits" in ops.values()


def test_mode_the_target_cannot_run_is_refused_naming_the_one_that_can():
    with pytest.raises(QuantizeError, match="fp8 cannot run on onnxruntime: FP8 needs TensorRT"):
        check_mode("fp8", "onnxruntime")
    with pytest.raises(QuantizeError, match="int8-dynamic cannot run on tensorrt: it runs on onnxruntime; for "
                                            "tensorrt use --quantize int8"):
        check_mode("int8-dynamic", "tensorrt")
    check_mode("fp8", "tensorrt")


def _one_error_line(r):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.strip().startswith("error:") and r.output.count("\n") == 1, r.output


def test_build_refuses_fp8_on_onnxruntime_before_distilling(tiny_dirs, tmp_path):
    r = CliRunner().invoke(main, ["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"),
                                  "--quantize", "fp8", "--calibration-samples", "8", *FAST])
    _one_error_line(r)
    assert "Build with --target tensorrt" in r.output and not (tmp_path / "b.run").exists()


def test_static_quantization_without_calibration_data(pruned_dirs, tmp_path):
    r = CliRunner().invoke(main, ["export", str(pruned_dirs["llama"]), "--out", str(tmp_path / "m.onnx"),
                                  "--quantize", "int8"])
    _one_error_line(r)
    assert "calibrates on 32 training sequences" in r.output and "holds 0" in r.output
    assert not (tmp_path / "m.int8.onnx").exists()


def test_config_checks_quantization_settings_at_once():
    from sparsekd_deploy.config import build_config
    from sparsekd_deploy.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        build_config(None, {"quantize": "int9", "calibration": "median", "num_samples": 16})
    assert any("quantize must be one of none, int8-dynamic, int8, int4-weight, fp8" in p for p in e.value.problems)
    assert any("calibration must be one of minmax, entropy, percentile" in p for p in e.value.problems)
    with pytest.raises(ConfigError, match="calibrates on 32 training sequences but the run samples only num_samples 16"):
        build_config(None, {"quantize": "int8", "num_samples": 16})


def test_export_command_int8_dynamic(pruned_dirs, tmp_path):
    r = CliRunner().invoke(main, ["export", str(pruned_dirs["llama"]), "--out", str(tmp_path / "m.onnx"),
                                  "--quantize", "int8-dynamic", "--pattern", "2:4", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)  # the quantizer's chatter stays off stdout
    assert res["quantization"]["path"] == str(tmp_path / "m.int8-dynamic.onnx")
    assert res["audit:m.int8-dynamic.onnx"]["holding"] == res["audit:m.onnx"]["checked"] > 0
    assert res["parity"]["int8-dynamic"]["kl"] > 0


@pytest.fixture(scope="module")
def int8_bundle(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("qbuild")
    r = CliRunner().invoke(main, ["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(root / "b"),
                                  "--quantize", "int8", "--calibration", "percentile", "--calibration-samples", "8",
                                  "--json", *FAST, *LOOSE], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return root / "b", json.loads(r.stdout[r.stdout.index("{"):])


def test_build_writes_the_quantized_graph_beside_fp32(int8_bundle):
    b, res = int8_bundle
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["model"]["onnx"] == "model.onnx" and manifest["model"]["onnx_int8"] == "model.int8.onnx"
    assert "model.int8.onnx" in manifest["files"]
    q = manifest["quantization"]
    assert q["file"] == "model.int8.onnx" and q["format"] == "QDQ"
    assert q["activations"].startswith("uint8 asymmetric")  # onnxruntime target: ORT's fast U8S8 kernels
    assert q["calibration"]["method"] == "percentile" and q["calibration"]["sequences"] == 8
    assert "training split" in q["calibration"]["source"]
    audit = json.loads((b / "audit.json").read_text())
    assert audit["model.int8.onnx"]["holding"] == audit["model.int8.onnx"]["checked"] == audit["model.onnx"]["checked"]
    assert res["quantized_validation"]["model"] == "model.int8.onnx" and res["validation"]["model"] == "model.onnx"
    assert (b / "validation/by-model/model.int8.onnx.json").is_file()
    assert (b / "validation/by-model/model.onnx.json").is_file()


def test_validate_model_by_precision_and_inspect_per_precision(int8_bundle):
    b, _ = int8_bundle
    r = CliRunner().invoke(main, ["validate", str(b), "--model", "int8", "--json", "--no-plots", *LOOSE])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "model.int8.onnx"
    r = CliRunner().invoke(main, ["validate", str(b), "--model", "int4-weight"])
    _one_error_line(r)
    assert "has no int4-weight graph (it has: fp32, int8)" in r.output
    r = CliRunner().invoke(main, ["inspect", str(b)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "graph fp32" in text and "graph int8" in text and "× fp32" in text and "PASS: kl_topk" in text


LEAN_PROBE = r"""
import json, sys
for name in ("torch", "transformers", "optimum", "accelerate", "matplotlib", "onnxscript", "onnx"):
    sys.modules[name] = None  # a lean device install: none of these can be imported
from click.testing import CliRunner
from sparsekd_deploy.cli import main
out = {}
for key, args in (("validate", ["validate", sys.argv[1], "--model", "int8", "--no-plots", "--json", *sys.argv[2:]]),
                  ("inspect", ["inspect", sys.argv[1]])):
    r = CliRunner().invoke(main, args)
    out[key] = [r.exit_code, r.output[-300:]]
out["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m])
print(json.dumps(out))
"""


def test_lean_device_install_validates_and_inspects_the_quantized_graph(int8_bundle, tmp_path):
    import shutil
    import subprocess
    import sys

    b = shutil.copytree(int8_bundle[0], tmp_path / "b")
    p = subprocess.run([sys.executable, "-c", LEAN_PROBE, str(b), *LOOSE], capture_output=True, text=True, timeout=300)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["validate"][0] == 0 and res["inspect"][0] == 0, res
    assert res["heavy"] == []


def test_tensorrt_target_gets_symmetric_int8_activations(tiny_dirs, tmp_path):
    """TensorRT takes zero point 0 only: the tensorrt bundle's int8 graph has symmetric activations (the onnxruntime
    one, test above, uint8 asymmetric), its weights' 2:4 audited, and it is validated on onnxruntime meanwhile."""
    from sparsekd_deploy.exporters.trt_compat import this_machine

    if this_machine()["tensorrt_version"] and this_machine()["compute_capability"]:
        pytest.skip("TensorRT and a GPU are here: the engine would be built for real")
    r = CliRunner().invoke(main, ["build", "--target", "tensorrt", "--teacher", str(tiny_dirs["llama"]),
                                  "--out", str(tmp_path / "b"), "--batch", "1,2,4", "--seq", "1,16,32", "--past",
                                  "0,16,32", "--quantize", "int8", "--calibration-samples", "8", "--json", *FAST, *LOOSE],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())
    assert manifest["quantization"]["activations"].startswith("int8 symmetric (zero point 0)")
    zps = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "b/model.int8.onnx")).graph.initializer
           if i.name.endswith("zero_point")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    audit = json.loads((tmp_path / "b/audit.json").read_text())["model.int8.onnx"]
    assert audit["holding"] == audit["checked"] > 0
    assert json.loads(r.stdout[r.stdout.index("{"):])["quantized_validation"]["model"] == "model.int8.onnx"


def test_int4_quantization_leaves_the_root_logger_as_it_was(exported, tmp_path):
    """ORT's int4 quantizer module calls logging.basicConfig(level=INFO) on import; ORT's fusers then printed ~100
    INFO lines per graph on stderr (an `export --quantize int4-weight --target onnxruntime`). In a fresh process,
    as the import happens once per process."""
    import subprocess
    import sys

    _, src = exported["llama"]
    code = ("import logging, sys\n"
            "from sparsekd_deploy.exporters.quantize import quantize_onnx\n"
            "quantize_onnx(sys.argv[1], sys.argv[2], 'int4-weight')\n"
            "root = logging.getLogger()\n"
            "print(logging.getLevelName(root.level), len(root.handlers))\n"
            "logging.getLogger('fusion_base').info('an ORT fuser line')\n")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "m.int4.onnx")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["WARNING", "0"]
    assert "an ORT fuser line" not in r.stderr


def test_an_int8_dynamic_graph_failing_determinism_says_why(tiny_dirs, tmp_path):
    """int8-dynamic's ranges are per call over the batch: its tokens depend on batch-mates and the `deterministic`
    gate fails (README). The verdict stays FAIL; the table now says why and what is batch-invariant."""
    from sparsekd_deploy.validate.validator import PER_CALL_RANGES

    b = tmp_path / "b"
    r = CliRunner().invoke(main, ["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(b), "--quantize",
                                  "int8-dynamic", "--json", *FAST, *LOOSE], catch_exceptions=False)
    assert (b / "model.int8-dynamic.onnx").is_file(), r.output
    r = CliRunner().invoke(main, ["validate", str(b), "--model", "int8-dynamic", "--json"])
    rows = {row["gate"]: row for row in json.loads(r.stdout)["gates"]}
    assert rows["deterministic"]["passed"] is False and rows["deterministic"]["note"] == PER_CALL_RANGES
    assert r.exit_code == 1
    r = CliRunner().invoke(main, ["validate", str(b), "--model", "int8-dynamic"])
    assert "deterministic: " + PER_CALL_RANGES in " ".join(r.output.split())
    r = CliRunner().invoke(main, ["validate", str(b), "--json"])  # the fp32 graph: no such note
    assert "note" not in {k for row in json.loads(r.stdout)["gates"] if row["gate"] == "deterministic" for k in row}
    # served one prompt per call, batch dependence does not matter: the user says so, the metric is still reported
    r = CliRunner().invoke(main, ["validate", str(b), "--model", "int8-dynamic", "--json", "--no-determinism-gate",
                                  *LOOSE])
    report = json.loads(r.stdout)
    assert "deterministic" not in {row["gate"] for row in report["gates"]}
    assert report["thresholds"]["require_determinism"] is False and report["metrics"]["deterministic"] is False
    assert report["passed"] and r.exit_code == 0
