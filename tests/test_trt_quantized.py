"""TensorRT engines from the bundle's quantized Q/DQ graph (issue 13, part 5), without a GPU: which graph, typing and
flags each TensorRT version gets, the trtexec lines of engine_build.json, the refusals (FP8 where the GPU or TensorRT
lacks it, a graph with zero points, int8-dynamic), and `engine add` of a trtexec INT8 build. The Python builder runs
against test_trt_builder_logic's recording stand-in for `tensorrt`; real builds are the tensorrt-marked tests' job."""

import json
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import cli_build, skip_where_tensorrt_runs
from test_engine_add import LAYERS, plan_bytes
from test_trt_builder_logic import fake_trt

from sparsekd_deploy.bundle import Bundle
from sparsekd_deploy.cli import main
from sparsekd_deploy.exporters import tensorrt as builder_mod
from sparsekd_deploy.exporters.engine_step import write_device_step
from sparsekd_deploy.exporters.quantize import quantize_onnx
from sparsekd_deploy.exporters.trt_precision import (
    EnginePrecisionError,
    asymmetric_qdq,
    check_device,
    check_for_tensorrt,
    choose,
)
from sparsekd_deploy.exporters.trt_profiles import Profile
from sparsekd_deploy.pipeline.export_step import calibration_feeds

# (precision, TensorRT major, sparse) -> (graph, strongly typed, BuilderFlags, trtexec switches)
CHOICES = {
    ("int8", 10, True): ("model.int8.onnx", False, ("FP16", "INT8", "SPARSE_WEIGHTS"),
                         ("--fp16", "--int8", "--sparsity=enable")),
    ("fp8", 10, True): ("model.fp8.onnx", False, ("FP16", "FP8", "SPARSE_WEIGHTS"), ("--fp16", "--fp8", "--sparsity=enable")),
    ("int4-weight", 10, True): ("model.int4.onnx", False, ("FP16", "INT4", "SPARSE_WEIGHTS"),
                                ("--fp16", "--int4", "--sparsity=enable")),
    ("int8", 10, False): ("model.int8.onnx", False, ("FP16", "INT8"), ("--fp16", "--int8")),
    ("int8", 11, True): ("model.int8.onnx", True, ("SPARSE_WEIGHTS",), ("--stronglyTyped", "--sparsity=enable")),
    ("fp8", 11, True): ("model.fp8.onnx", True, ("SPARSE_WEIGHTS",), ("--stronglyTyped", "--sparsity=enable")),
    ("fp16", 10, True): ("model.onnx", False, ("FP16", "SPARSE_WEIGHTS"), ("--fp16", "--sparsity=enable")),
    ("fp16", 11, True): ("model.fp16.onnx", True, ("SPARSE_WEIGHTS",), ("--stronglyTyped", "--sparsity=enable")),
    ("fp32", 10, False): ("model.onnx", False, (), ()),
}
GRAPH = {"int8": "model.int8.onnx", "fp8": "model.fp8.onnx", "int4-weight": "model.int4.onnx"}


@pytest.mark.parametrize("key", CHOICES, ids=[f"{p}-trt{m}-{'sparse' if s else 'dense'}" for p, m, s in CHOICES])
def test_graph_typing_and_flags_per_tensorrt_version(key):
    precision, major, sparse = key
    got = choose(precision, trt_major=major, sparse=sparse, fp16_graph="model.fp16.onnx",
                 quantized_graph=GRAPH.get(precision))
    assert (got.onnx, got.strongly_typed, got.flags, got.trtexec) == CHOICES[key]


@pytest.mark.parametrize("precision, kwargs, needle", [
    ("int8-dynamic", {"quantized_graph": "model.int8-dynamic.onnx"}, "TensorRT cannot build; rebuild the bundle with "
                                                                      "--target tensorrt --quantize int8"),
    ("int8", {}, "the bundle has no int8 graph to build a int8 engine from; rebuild it with --target tensorrt"),
    ("bf16", {}, "unknown engine precision 'bf16'"),
])
def test_precisions_that_cannot_be_built_are_refused(precision, kwargs, needle):
    with pytest.raises(EnginePrecisionError, match=needle):
        choose(precision, trt_major=10, sparse=True, **kwargs)


@pytest.mark.parametrize("trt, cc, needle", [
    ("10.3.0", "8.7", "compute capability 8.7 has no FP8 tensor cores"),  # Jetson Orin
    ("9.3.0", "9.0", "TensorRT 9.3.0 is older than 10"),
    ("8.6.1", "8.6", "TensorRT 8.6.1 is older than 10; this GPU's compute capability 8.6 has no FP8"),
])
def test_fp8_is_refused_where_the_gpu_or_tensorrt_lacks_it(trt, cc, needle):
    with pytest.raises(EnginePrecisionError, match=needle):
        check_device("fp8", trt, cc)


def test_fp8_and_int8_pass_where_they_run():
    check_device("fp8", "10.3.0", "8.9")  # Ada
    check_device("fp8", "11.0.0", "9.0")  # Hopper
    check_device("int8", "10.3.0", "8.7")  # INT8 on Orin


@pytest.fixture(scope="module")
def qdq_graphs(exported, tmp_path_factory):
    """The tiny Llama's 2:4 graph quantized int8 for TensorRT (symmetric) and for ONNX Runtime (uint8 activations)."""
    _, path = exported["llama"]
    root = tmp_path_factory.mktemp("qdq")
    feeds = calibration_feeds(path, np.random.default_rng(0).integers(0, 64, (8, 16)))
    out = {}
    for target in ("tensorrt", "onnxruntime"):
        d = root / target
        d.mkdir()
        shutil.copy(path, d / "model.onnx")
        quantize_onnx(path, d / "model.int8.onnx", "int8", target=target, calibration=feeds)
        out[target] = d
    return out


def test_zero_points_are_read_from_the_graph(qdq_graphs):
    assert asymmetric_qdq(qdq_graphs["tensorrt"] / "model.int8.onnx") == []
    bad = asymmetric_qdq(qdq_graphs["onnxruntime"] / "model.int8.onnx")
    assert bad  # uint8 activations carry zero points
    with pytest.raises(EnginePrecisionError, match=r"zero points .* in \d+ Q/DQ node\(s\).*--target tensorrt"):
        check_for_tensorrt(qdq_graphs["onnxruntime"] / "model.int8.onnx")


def test_onnxruntime_operator_forms_are_refused(exported, tmp_path):
    _, path = exported["llama"]
    for mode, ops in (("int8-dynamic", "DynamicQuantizeLinear, MatMulInteger"), ("int4-weight", "MatMulNBits")):
        dst = tmp_path / f"{mode}.onnx"
        quantize_onnx(path, dst, mode, target="onnxruntime")
        with pytest.raises(EnginePrecisionError, match=f"ONNX Runtime's own operators \\(.*{ops.split(',')[0]}"):
            check_for_tensorrt(dst)


def _build(d, monkeypatch, version, cc, **kw):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(version, calls))
    monkeypatch.setattr(builder_mod, "this_machine", lambda: {"tensorrt_version": version, "compute_capability": cc,
                                                              "cuda_version": "12.6", "device_name": "GPU"})
    res = builder_mod.build_engine(d / "model.onnx", None, d / "out", Profile(), onnx_quantized=d / "model.int8.onnx",
                                   **kw)
    return res, calls


def test_tensorrt10_builds_int8_from_the_qdq_graph_with_its_flags(qdq_graphs, monkeypatch):
    res, calls = _build(qdq_graphs["tensorrt"], monkeypatch, "10.16.1", "8.7", precision="int8")
    assert ("parse", "model.int8.onnx") in calls
    assert [c[1] for c in calls if c[0] == "flag"] == ["FP16", "INT8", "SPARSE_WEIGHTS"]
    e = res.engine
    assert (e["precision"], e["onnx"], e["strongly_typed"], e["builder_flags"]) == \
        ("int8", "model.int8.onnx", False, ["FP16", "INT8", "SPARSE_WEIGHTS"])


def test_tensorrt11_builds_int8_strongly_typed_without_precision_flags(qdq_graphs, monkeypatch):
    res, calls = _build(qdq_graphs["tensorrt"], monkeypatch, "11.0.0", "9.0", precision="int8")
    assert ("parse", "model.int8.onnx") in calls
    assert [c[1] for c in calls if c[0] == "flag"] == ["SPARSE_WEIGHTS"]
    assert res.engine["strongly_typed"] and res.engine["precision"] == "int8"


def test_builder_refuses_before_parsing(qdq_graphs, monkeypatch):
    with pytest.raises(EnginePrecisionError, match="compute capability 8.7 has no FP8 tensor cores"):
        _build(qdq_graphs["tensorrt"], monkeypatch, "10.16.1", "8.7", precision="fp8")
    with pytest.raises(EnginePrecisionError, match="zero points"):
        _build(qdq_graphs["onnxruntime"], monkeypatch, "10.16.1", "8.7", precision="int8")


@pytest.fixture(scope="module")
def trt_int8_bundle(tiny_dirs, tmp_path_factory):
    """`build --target tensorrt --quantize int8` where there is no TensorRT/GPU: the engine step is written."""
    skip_where_tensorrt_runs()
    root = tmp_path_factory.mktemp("trt-int8")
    cli_build(tiny_dirs["llama"], root / "b", "--target", "tensorrt", "--batch", "1,2,4", "--seq", "1,16,32",
              "--past", "0,16,32", "--quantize", "int8", "--calibration-samples", "8")
    return root / "b"


def test_engine_step_builds_from_the_int8_qdq_graph(trt_int8_bundle):
    step = json.loads((trt_int8_bundle / "engine_build.json").read_text())
    v10, v11 = step["trtexec_tensorrt10"], step["trtexec_tensorrt11"]
    assert "--onnx=model.int8.onnx" in v10 and v10[-3:] == ["--fp16", "--int8", "--sparsity=enable"]
    assert "--onnx=model.int8.onnx" in v11 and v11[-2:] == ["--stronglyTyped", "--sparsity=enable"]
    assert "--int8" not in v11 and "--int8" in step["trtexec_tensorrt10_line"]
    assert step["python_builder"][-2:] == ["--precision", "int8"]
    assert step["precision"] == "int8" and step["quantized_onnx"] == "model.int8.onnx"
    assert "no calibrator" in step["note"]


def test_fp8_step_says_which_gpus_run_it(trt_int8_bundle, tmp_path):
    d = shutil.copytree(trt_int8_bundle, tmp_path / "b")
    step = write_device_step(d, Profile(), fp16=True, sparse=True, workspace_mib=4096,
                             quantization={"mode": "fp8", "file": "model.fp8.onnx"})
    assert step["trtexec_tensorrt10"][-3:] == ["--fp16", "--fp8", "--sparsity=enable"]
    assert "compute capability 8.9" in step["note"]


INT8_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v101601] [b11] # trtexec --onnx=model.int8.onnx --saveEngine=engine.plan --fp16 --int8 --sparsity=enable
[11/28/2026-10:00:00] [I] Precision: FP32+FP16+INT8
[11/28/2026-10:00:00] [I] Sparsity: Enabled
[11/28/2026-10:00:00] [I] Selected Device: Orin
[11/28/2026-10:00:00] [I] Compute Capability: 8.7
[11/28/2026-10:00:01] [V] [TRT] (Sparsity) Found 1 layer(s) eligible to use sparse tactics: /model/layers.0/mlp/up_proj/MatMul
&&&& PASSED TensorRT.trtexec [TensorRT v101601] [b11] # trtexec --onnx=model.int8.onnx --saveEngine=engine.plan
"""


def test_engine_add_records_an_int8_trtexec_build(trt_int8_bundle, tmp_path):
    d = shutil.copytree(trt_int8_bundle, tmp_path / "b")
    (d / "engine.plan").write_bytes(plan_bytes(10, 16, 1))
    (d / "trtexec.log").write_text(INT8_LOG)
    (d / "engine.layers.json").write_text(json.dumps(LAYERS))
    r = CliRunner().invoke(main, ["engine", "add", str(d), "--plan", str(d / "engine.plan"), "--log",
                                  str(d / "trtexec.log"), "--layers", str(d / "engine.layers.json"), "--json"])
    assert r.exit_code == 0, r.output
    e = json.loads((d / "manifest.json").read_text())["engine"]
    assert (e["precision"], e["onnx"], e["sparse_weights"]) == ("int8", "model.int8.onnx", True)


def test_engine_build_defaults_to_the_bundles_int8_graph(trt_int8_bundle, tmp_path, monkeypatch):
    from sparsekd_deploy.pipeline.engine import build_into_bundle

    d = shutil.copytree(trt_int8_bundle, tmp_path / "b")
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("10.16.1", calls))
    monkeypatch.setattr(builder_mod, "this_machine", lambda: {"tensorrt_version": "10.16.1", "compute_capability": "8.7",
                                                              "cuda_version": "12.6", "device_name": "Orin"})
    res = build_into_bundle(Bundle.open(d), None, fp16=True, sparse=True, workspace_mib=1024)
    assert ("parse", "model.int8.onnx") in calls and ("flag", "INT8") in calls
    assert json.loads((d / "manifest.json").read_text())["engine"]["precision"] == res.engine["precision"] == "int8"
