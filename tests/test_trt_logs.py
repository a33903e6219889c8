"""Parsing real TensorRT output (recorded in ../shared/data/tensorrt-logs); skips cleanly where that is absent."""

import json
import re

import pytest
from conftest import SHARED

from sparsekd_deploy.exporters import trt_logs as T

LOGS = SHARED / "data" / "tensorrt-logs"
pytestmark = pytest.mark.skipif(not LOGS.is_dir(), reason=f"recorded TensorRT logs not found at {LOGS}")


def read(prefix):
    return next(LOGS.glob(prefix + "*")).read_text()


def test_trt84_eligible_none_picked():
    log = T.parse_sparsity(read("01-"))
    assert log.wording == "8.x" and len(log.eligible) == 20 and log.chosen == []
    assert log.eligible[0] == "(Unnamed Layer* 0) [Convolution]"


def test_trt1016_verbose_found_and_chose_zero():
    log = T.parse_sparsity(read("02-"))
    # once inside the Myelin (foreignNode) block, once for the whole engine
    assert log.wording == "10.x" and log.chosen == []
    assert log.eligible == ["node_linear", "node_conv2d + node_relu", "node_conv2d_1 + node_relu_1"]
    assert log.reported_counts == [(1, 0), (2, 0)]


def test_trtexec_both_lists_empty():
    log = T.parse_sparsity(read("03-"))
    assert log.seen and log.eligible == [] and log.chosen == []


def test_terminal_wrapped_eligible_list_is_rejoined():
    log = T.parse_sparsity(read("04-"))
    assert "MatMul_139" in log.eligible and "MatMul_317" in log.eligible and "Gemm_725" in log.eligible
    assert not any(x in ("Mat", "Mul_139") for x in log.eligible)
    assert log.eligible[0] == "Conv_22" and all(x.startswith(("MatMul_", "Conv_", "Gemm_")) for x in log.eligible)


def test_trt80_python_logger_prefix_and_perf():
    text = read("05-")
    log = T.parse_sparsity(text)
    assert log.eligible == ["Conv_0"] and log.chosen == []
    assert T.parse_trtexec_performance(text)["throughput_qps"] == pytest.approx(498.367)


def test_inspector_84_no_sparse_weights():
    rep = T.parse_inspector(read("06-"))
    assert rep["detailed"] and rep["schema"] == "8.x"
    assert rep["sparse_tactics"] == [] and rep["with_sparse_weights"] == []


def test_inspector_10x_schema_and_layers():
    rep = T.parse_inspector(read("07-"))
    assert rep["schema"] == "10.x" and len(rep["layers"]) == 2 and not rep["detailed"]


def test_has_sparse_weights_alone_is_not_a_sparse_tactic():
    # The fragments are not JSON: lift each fragment's real "HasSparseWeights"/"TacticName" lines into one layer
    # record and let the product parser decide which layer ran a sparse tactic.
    layers = []
    for i, fragment in enumerate(re.split(r"^# \[collector.*$", read("08-"), flags=re.MULTILINE)[1:]):
        fields = [json.loads("{" + line.strip().rstrip(",") + "}") for line in fragment.splitlines()
                  if line.strip().startswith(('"HasSparseWeights"', '"TacticName"'))]
        layers.append({"Name": f"fragment{i + 1}", **{k: v for f in fields for k, v in f.items()}})
    rep = T.parse_inspector(json.dumps({"Layers": layers}))
    assert rep["with_sparse_weights"] == ["fragment1", "fragment2"]  # both have HasSparseWeights: 1
    assert rep["sparse_tactics"] == ["fragment1"]  # only the _sparse_ tactic counts; fragment 2's is dense
    assert rep["detailed"] and "sparse" in rep["layers"][0]["tactic"] and "sparse" not in rep["layers"][1]["tactic"]


def test_inspector_11x_io_tensors():
    rep = T.parse_inspector(read("10-"))
    assert rep["schema"].startswith("11.x") and rep["io_tensors"] == ["input_0"]


def test_parser_errors_are_summarised():
    assert "plugin not found (name, version or namespace)" in T.parse_parser_errors(read("11-"))
    assert "failed at node 1 (UnknownNode1)" in T.parse_parser_errors(read("11-"))
    errs = T.parse_parser_errors(read("12-"))
    assert "unsupported ONNX op grid_sampler" in errs and "no plugin grid_sampler (version 1)" in errs


@pytest.mark.parametrize("prefix,expected", [
    ("13-", {"runtime": "8.0.0", "engine": "8.0.1", "kind": "library version"}),
    ("14-", {"runtime": "213", "engine": "232", "kind": "serialization tag"}),
    ("15-", {"runtime": "237", "engine": "239", "kind": "serialization tag"}),
])
def test_version_mismatch_messages(prefix, expected):
    assert T.parse_deserialize_error(read(prefix)) == expected


def test_trtexec_performance_summary():
    perf = T.parse_trtexec_performance(read("16-"))
    assert perf["throughput_qps"] == pytest.approx(15374.3)
    assert perf["latency_mean_ms"] == pytest.approx(0.0441053)
    assert perf["tensorrt_version_code"] == 101601


def test_report_combines_log_and_inspector():
    log = T.parse_sparsity(read("02-"))
    rep = T.sparsity_report(log, T.parse_inspector(read("06-")))
    assert rep["summary"] == "3 layer(s) eligible, 0 picked a sparse tactic"
    assert "below VERBOSE" in T.sparsity_report(T.parse_sparsity("nothing here"), None)["summary"]


def test_trtexec_build_facts_per_version():
    # 8.4 banner code v8402 (major·1000 + minor·100 + patch); FP32 build with --sparsity=force.
    assert T.parse_trtexec_build(read("03-")) == {
        "tensorrt_version": "8.4.2", "precision_line": "FP32", "precision": "fp32",
        "sparsity_option": "Forced", "sparse_weights": True, "onnx": "bert-sparse-ASP-qabase-sq128-b1.onnx"}
    # 10.16 banner code v101601 (major·10000 + minor·100 + patch); dense run.
    facts = T.parse_trtexec_build(read("16-"))
    assert facts["tensorrt_version"] == "10.16.1" and facts["sparse_weights"] is False
    assert "compute_capability" not in facts  # that excerpt omits the device block: nothing is guessed
    assert T.version_from_code(100100) == "10.1.0" and T.version_from_code(8601) == "8.6.1"


def test_engine_built_lines_of_real_logs():
    # trtexec 8.4 "Engine built in", builder 8.4 / 10.16 "Engine generation completed", 10.x "Adding 1 engine(s)".
    assert all(T.log_says_engine_built(read(p)) for p in ("01-", "02-", "03-"))
    # A performance excerpt, a parser failure and a deserialisation error never say an engine was built.
    assert not any(T.log_says_engine_built(read(p)) for p in ("11-", "13-", "16-"))
    lines = [ln for ln in read("03-").splitlines() if "Engine built in" not in ln and "Loaded engine size" not in ln]
    assert not T.log_says_engine_built("\n".join(lines))  # banner, options and sparsity lines alone prove nothing
