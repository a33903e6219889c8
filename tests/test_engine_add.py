"""`engine add`: an engine built by trtexec on the device joins the bundle with the same record as the Python
builder's. No TensorRT needed: the plan is a stand-in with a real header layout; facts come from the log."""

import json
import random
import shutil

import pytest
from click.testing import CliRunner

from sparsekd_deploy.bundle import Bundle
from sparsekd_deploy.cli import main
from sparsekd_deploy.exporters.trt_compat import this_machine

# trtexec's own line formats (banner, device block, build options, 10.x VERBOSE sparsity lines).
TRTEXEC_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v101601] [b11] # trtexec --onnx=model.onnx --saveEngine=engine.plan --fp16 --sparsity=enable
[11/28/2026-10:00:00] [I] === Build Options ===
[11/28/2026-10:00:00] [I] Precision: FP32+FP16
[11/28/2026-10:00:00] [I] Sparsity: Enabled
[11/28/2026-10:00:00] [I] === Device Information ===
[11/28/2026-10:00:00] [I] Selected Device: Orin
[11/28/2026-10:00:00] [I] Compute Capability: 8.7
[11/28/2026-10:00:01] [V] [TRT] (Sparsity) Found 2 layer(s) eligible to use sparse tactics: /model/layers.0/mlp/up_proj/MatMul, /model/layers.0/mlp/down_proj/MatMul
[11/28/2026-10:00:02] [V] [TRT] (Sparsity) Chose 1 layer(s) using sparse tactics: /model/layers.0/mlp/up_proj/MatMul
&&&& PASSED TensorRT.trtexec [TensorRT v101601] [b11] # trtexec --onnx=model.onnx --saveEngine=engine.plan
"""
LAYERS = {"Layers": [
    {"Name": "/model/layers.0/mlp/up_proj/MatMul", "LayerType": "CaskGemmMatrixMultiply", "HasSparseWeights": 1,
     "TacticName": "sm87_xmma_sparse_gemm_f16f16_f16f32_f32_nn_n_tilesize128x128x64", "StreamId": 0},
    {"Name": "/model/layers.0/mlp/down_proj/MatMul", "LayerType": "CaskGemmMatrixMultiply", "HasSparseWeights": 1,
     "TacticName": "sm87_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize64x64x64", "StreamId": 0},
], "Bindings": ["input_ids", "logits"]}


def plan_bytes(major, minor, patch):
    """TensorRT ≥ 8.6 keeps major.minor.patch at bytes 24–26 of the plan."""
    return bytes(8) + (239).to_bytes(4, "little") + bytes(12) + bytes([major, minor, patch]) + bytes(200)


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture
def device_dir(device_step_bundle, tmp_path):
    """A copy of the bundle as it sits on the device after the trtexec line ran in it."""
    path = tmp_path / "b"
    shutil.copytree(device_step_bundle[0], path)
    (path / "engine.plan").write_bytes(plan_bytes(10, 16, 1))
    (path / "trtexec.log").write_text(TRTEXEC_LOG)
    (path / "engine.layers.json").write_text(json.dumps(LAYERS))
    (path / "timing.cache").write_bytes(b"cache")  # trtexec's stray: must not be blessed into the manifest
    return path


def test_engine_add_records_what_trtexec_built(device_dir):
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
             "--log", str(device_dir / "trtexec.log"), "--layers", str(device_dir / "engine.layers.json"), "--json"])
    assert r.exit_code == 0, r.output
    b = Bundle.open(device_dir)  # checksums of the new files verify
    e = b.manifest["engine"]
    assert (e["tensorrt_version"], e["compute_capability"], e["device_name"]) == ("10.16.1", "8.7", "Orin")
    assert e["precision"] == "fp16" and e["sparse_weights"] and not e["strongly_typed"] and e["onnx"] == "model.onnx"
    assert e["built_with"] == "trtexec" and e["profile"]["batch"] == {"min": 1, "opt": 2, "max": 4}
    for name in ("engine.plan", "engine.sparsity.json", "engine.build.log", "engine.layers.json"):
        assert name in b.manifest["files"]
    assert "timing.cache" not in b.manifest["files"] and "trtexec.log" not in b.manifest["files"]
    report = json.loads((device_dir / "engine.sparsity.json").read_text())
    assert report["summary"] == "2 layer(s) eligible, 1 picked a sparse tactic"
    assert report["layers_with_sparse_tactic"] == ["/model/layers.0/mlp/up_proj/MatMul"]
    # HasSparseWeights on down_proj did not make it count: its tactic is dense.
    assert report["inspector"]["with_sparse_weights"] == [ly["Name"] for ly in LAYERS["Layers"]]
    r = CliRunner().invoke(main, ["inspect", str(device_dir)], env={"COLUMNS": "250"})  # table rows unwrapped
    assert r.exit_code == 0 and "TensorRT 10.16.1 on Orin (sm 8.7)" in r.output and "built with trtexec" in r.output
    assert "batch 1–4 (opt 2)" in r.output


def test_engine_add_again_without_reports_drops_the_stale_ones(device_dir):
    assert run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
                "--log", str(device_dir / "trtexec.log"), "--layers", str(device_dir / "engine.layers.json")]).exit_code == 0
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"), "--compute-capability", "8.7"])
    assert r.exit_code == 0, r.output
    b = Bundle.open(device_dir)
    assert "engine.layers.json" not in b.manifest["files"] and not (device_dir / "engine.layers.json").exists()
    assert "engine.build.log" not in b.manifest["files"]
    assert b.manifest["engine"]["sparsity_summary"] == "no build log given: eligible layers unknown"


def test_engine_add_refuses_a_log_from_another_build(device_dir):
    (device_dir / "engine.plan").write_bytes(plan_bytes(10, 14, 1))
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
             "--log", str(device_dir / "trtexec.log")])
    assert r.exit_code == 2 and "header says TensorRT 10.14.1, the log says 10.16.1" in r.output
    assert "engine" not in Bundle.open(device_dir).manifest  # nothing half-written


def test_engine_add_refuses_a_contradicting_compute_capability(device_dir):
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
             "--log", str(device_dir / "trtexec.log"), "--compute-capability", "9.0"])
    assert r.exit_code == 2 and "the log says the engine was built on 8.7 (Orin)" in r.output


@pytest.mark.skipif(bool(this_machine()["compute_capability"]), reason="a GPU here answers the question itself")
def test_engine_add_without_log_needs_the_gpu(device_dir):
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan")])
    assert r.exit_code == 2 and "--compute-capability" in r.output


def test_engine_add_records_the_shapes_trtexec_really_used(device_dir):
    # The user edited the line from engine_build.json (batch max 4 → 8): the target must chunk at 8, not 4.
    step = json.loads((device_dir / "engine_build.json").read_text())

    def batch_8(arg):  # --maxShapes=name:4x...,name:4x... → every leading (batch) dim 8
        flag, items = arg.split("=", 1)
        return flag + "=" + ",".join(f"{n}:8x{dims.split('x', 1)[1]}" for n, dims in (i.rsplit(":", 1) for i in items.split(",")))

    argv = [batch_8(a) if a.startswith("--maxShapes=") else a for a in step["trtexec_tensorrt10"]]
    (device_dir / "trtexec.log").write_text(TRTEXEC_LOG.replace(
        "# trtexec --onnx=model.onnx --saveEngine=engine.plan --fp16 --sparsity=enable", "# " + " ".join(argv), 1))
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
             "--log", str(device_dir / "trtexec.log")])
    assert r.exit_code == 0, r.output
    prof = Bundle.open(device_dir).manifest["engine"]["profile"]
    assert prof["batch"] == {"min": 1, "opt": 2, "max": 8}
    assert prof["seq"] == {"min": 1, "opt": 16, "max": 32} and prof["past"] == {"min": 0, "opt": 16, "max": 32}


def test_engine_add_refuses_an_engine_of_another_graph(device_dir):
    (device_dir / "trtexec.log").write_text(TRTEXEC_LOG.replace("--onnx=model.onnx", "--onnx=/x/resnet50.onnx"))
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
             "--log", str(device_dir / "trtexec.log")])
    assert r.exit_code == 2 and "built resnet50.onnx, which is not a graph of this bundle" in r.output


@pytest.mark.parametrize("what,args,needle", [
    ("missing plan", ["--plan", "nope.plan"], "engine plan nope.plan does not exist"),
    ("bad layers", ["--plan", "{d}/engine.plan", "--log", "{d}/trtexec.log", "--layers", "{d}/trtexec.log"],
     "is not JSON"),
    ("not a plan", ["--plan", "{d}/timing.cache", "--compute-capability", "8.7"], "too short to be a TensorRT plan"),
    ("bad cc", ["--plan", "{d}/engine.plan", "--compute-capability", "sm87"], "must look like 8.7"),
])
def test_engine_add_bad_input(device_dir, what, args, needle):
    r = run(["engine", "add", str(device_dir), *[a.format(d=device_dir) for a in args]])
    assert r.exit_code == 2 and needle in r.output, (what, r.output)


@pytest.mark.skipif(bool(this_machine()["tensorrt_version"]), reason="TensorRT is installed here")
def test_validating_an_added_engine_without_tensorrt_says_where_to_run(device_dir):
    assert run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
                "--log", str(device_dir / "trtexec.log")]).exit_code == 0
    r = run(["validate", str(device_dir), "--runtime", "tensorrt"])
    assert r.exit_code == 2 and "TensorRT is not installed here" in r.output and "validate on that device" in r.output


def test_engine_add_tensorrt11_precision_comes_from_the_graph(device_dir):
    # Strongly typed: trtexec builds the FP16 graph; its "Precision:" option line does not carry the precision.
    log = ("&&&& RUNNING TensorRT.trtexec [TensorRT v110400] # trtexec --onnx=/data/b/model.fp16.onnx "
           "--saveEngine=engine.plan --stronglyTyped --sparsity=enable\n"
           "[11/28/2026-10:00:00] [I] Precision: FP32\n"
           "[11/28/2026-10:00:00] [I] Sparsity: Enabled\n"
           "[11/28/2026-10:00:00] [I] Selected Device: NVIDIA H100 80GB HBM3\n"
           "[11/28/2026-10:00:00] [I] Compute Capability: 9.0\n")
    (device_dir / "trtexec.log").write_text(log)
    (device_dir / "engine.plan").write_bytes(plan_bytes(11, 4, 0))
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
             "--log", str(device_dir / "trtexec.log")])
    assert r.exit_code == 0, r.output
    e = Bundle.open(device_dir).manifest["engine"]
    assert (e["tensorrt_version"], e["compute_capability"]) == ("11.4.0", "9.0")
    assert e["strongly_typed"] and e["precision"] == "fp16" and e["onnx"] == "model.fp16.onnx"


# The four lines of item 12: banner, device, compute capability, precision; nothing says an engine was built.
FOUR_LINE_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v8402] # trtexec --onnx=model.onnx --saveEngine=engine.plan --fp16
[11/28/2026-10:00:00] [I] Selected Device: Orin
[11/28/2026-10:00:00] [I] Compute Capability: 8.7
[11/28/2026-10:00:00] [I] Precision: FP32+FP16
"""


def test_engine_add_refuses_random_bytes_that_no_log_line_built(device_dir):
    data = bytearray(random.Random(12).randbytes(4096))
    data[24] = 0  # bytes 24–26 carry no TensorRT version: no signature in the header
    (device_dir / "engine.plan").write_bytes(bytes(data))
    (device_dir / "trtexec.log").write_text(FOUR_LINE_LOG)
    args = ["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
            "--log", str(device_dir / "trtexec.log")]
    r = run(args)
    assert r.exit_code == 2 and "does not look like a TensorRT plan" in r.output, r.output
    assert "engine" not in Bundle.open(device_dir).manifest and "engine.plan" not in Bundle.open(device_dir).manifest["files"]
    # A pre-8.6 plan has no version in its header either: trtexec's own "Engine built in" line vouches for it.
    (device_dir / "trtexec.log").write_text(FOUR_LINE_LOG + "[11/28/2026-10:00:31] [I] Engine built in 31.1935 sec.\n")
    r = run(args)
    assert r.exit_code == 0, r.output
    assert Bundle.open(device_dir).manifest["engine"]["tensorrt_version"] == "8.4.2"


@pytest.mark.parametrize("layer_info,needle", [
    ([1, 2], 'is a JSON list, not an object with a "Layers" list'),
    (42, 'is a JSON number, not an object with a "Layers" list'),
    ({"Layers": 3}, 'has "Layers" as a JSON number, not a list'),
    ({"Layers": [7]}, 'has "Layers"[0] as a JSON number, not a layer object or name'),
    ({"Layers": [{"Name": "a", "TacticName": 5}]}, '"Layers"[0].TacticName as a JSON number, not a string'),
])
def test_engine_add_layer_info_of_another_shape(device_dir, layer_info, needle):
    (device_dir / "engine.layers.json").write_text(json.dumps(layer_info))
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
             "--log", str(device_dir / "trtexec.log"), "--layers", str(device_dir / "engine.layers.json")])
    assert r.exit_code == 2 and needle in r.output and "--exportLayerInfo" in r.output, r.output


@pytest.mark.parametrize("shapes", [
    "--minShapes=input_ids:1 --optShapes=input_ids:2 --maxShapes=input_ids:4",  # 1-D input_ids: no seq axis
    "--minShapes=input_ids:1x1 --optShapes=input_ids:2x16 "  # a past in max only
    "--maxShapes=input_ids:4x32,past_key_values.0.key:4x2x32x8",
])
def test_engine_add_odd_shapes_line(device_dir, shapes):
    (device_dir / "trtexec.log").write_text(TRTEXEC_LOG.replace("--fp16 --sparsity=enable", f"--fp16 {shapes}", 1))
    r = run(["engine", "add", str(device_dir), "--plan", str(device_dir / "engine.plan"),
             "--log", str(device_dir / "trtexec.log")])
    assert r.exit_code == 2 and "the trtexec log's shapes do not fit this bundle's graph" in r.output, r.output
    assert "engine" not in Bundle.open(device_dir).manifest
