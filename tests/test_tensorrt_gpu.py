"""TensorRT on a real GPU: engine build with SPARSE_WEIGHTS, the sparsity report, validation on the engine.
Skips with the reason that names what is missing (TensorRT, a GPU)."""

import importlib.util
import json

import pytest
import torch

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0),
                       reason="this GPU has no 2:4 sparse tensor cores (compute capability < 8.0)"),
]


@pytest.fixture(scope="module")
def trt_bundle(tiny_dirs, tmp_path_factory):
    from click.testing import CliRunner

    from sparsekd_deploy.cli import main

    root = tmp_path_factory.mktemp("trt")
    r = CliRunner().invoke(main, [
        "build", "--target", "tensorrt", "--teacher", str(tiny_dirs["llama"]), "--out", str(root / "b"),
        "--run-dir", str(root / "run"), "--batch", "1,1,2", "--seq", "1,16,32", "--past", "0,16,32",
        "--stages", "1", "--steps-per-stage", "2", "--kl-budget", "50", "--seq-len", "32", "--num-samples", "8",
        "--batch-size", "4", "--max-kl", "5", "--min-top1", "0", "--min-greedy-match", "0", "--max-ppl-ratio", "100",
        "--min-consistency-ratio", "0", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return root / "b", json.loads(r.stdout[r.stdout.index("{"):])


def test_engine_built_with_sparsity_report(trt_bundle):
    path, res = trt_bundle
    m = json.loads((path / "manifest.json").read_text())
    assert "engine.plan" in m["files"] and m["engine"]["tensorrt_version"]
    rep = json.loads((path / "engine.sparsity.json").read_text())
    # The builder logs at VERBOSE with SPARSE_WEIGHTS on a GPU with sparse tensor cores (the fixture needs one), so
    # TensorRT must report the 2:4-pruned GEMMs as eligible: "no sparsity lines" here is a failure, not an outcome.
    assert rep["log"]["eligible"], rep["summary"]
    assert "eligible" in rep["summary"]
    assert res["validation"]["runtime"]["runtime"] == "tensorrt"


def test_validate_on_engine_and_refuse_foreign_engine(trt_bundle, tmp_path):
    import shutil

    from click.testing import CliRunner

    from sparsekd_deploy.cli import main

    path, _ = trt_bundle
    r = CliRunner().invoke(main, ["validate", str(path), "--runtime", "tensorrt", "--max-kl", "5", "--min-top1", "0",
                                  "--min-greedy-match", "0", "--max-ppl-ratio", "100", "--min-consistency-ratio", "0"])
    assert r.exit_code == 0, r.output
    other = tmp_path / "other"
    shutil.copytree(path, other)
    m = json.loads((other / "manifest.json").read_text())
    m["engine"]["compute_capability"] = "7.2"
    m["engine"]["device_name"] = "Xavier"
    (other / "manifest.json").write_text(json.dumps(m))
    r = CliRunner().invoke(main, ["validate", str(other), "--runtime", "tensorrt"])
    assert r.exit_code == 2 and "compute capability 7.2 (Xavier)" in r.output
