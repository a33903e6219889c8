"""The library used directly, without the CLI: `pipeline.build` (the tensorrt target on a machine without TensorRT
writes the device step and validates the ONNX graph on onnxruntime) and the typed results it chains."""

import json

import pytest

from sparsekd_deploy.bundle import Bundle, BundleError
from sparsekd_deploy.config import build_config
from sparsekd_deploy.exporters.trt_compat import this_machine
from sparsekd_deploy.pipeline import BuildOptions, BuildResult, build
from sparsekd_deploy.validate.gate import Gates
from sparsekd_deploy.validate.validator import validate_bundle

LOOSE = Gates(max_kl=5, min_top1=0, min_greedy_match=0, max_ppl_ratio=100, min_consistency_ratio=0)


def _cfg(teacher, **kw):
    return build_config(None, dict(teacher=str(teacher), stages=2, steps_per_stage=4, retries=0, kl_budget=50.0,
                                   seq_len=32, num_samples=16, batch_size=4, **kw))


@pytest.fixture(scope="module")
def trt_build(tiny_dirs, tmp_path_factory):
    if this_machine()["tensorrt_version"] and this_machine()["compute_capability"]:
        pytest.skip("TensorRT and a GPU are here: the engine is built for real (tensorrt-marked tests)")
    root = tmp_path_factory.mktemp("lib")
    res = build(_cfg(tiny_dirs["llama"]), root / "b", BuildOptions(target="tensorrt"), gates=LOOSE)
    return root, res


def test_library_build_for_tensorrt_without_the_cli(trt_build):
    root, res = trt_build
    assert isinstance(res, BuildResult) and res.bundle == root / "b"
    # the run sits beside its bundle and the manifest says where
    assert res.run_dir == root / "b.run" and (root / "b.run" / "student" / "config.json").is_file()
    b = Bundle.open(res.bundle)
    assert b.manifest["distillation"]["run_dir"] == str(root / "b.run")
    assert res.engine["status"] == "to be built on the device" and b.has("engine_build.json")
    assert res.reached_target and res.shortfall is None and res.passed
    assert b.manifest["pattern_share"] == pytest.approx(1.0)  # every pruned group holds 2:4 in the graph
    # seeded golden values of this 2-stage, 8-step run on the tiny Llama (seed 0)
    assert res.distillation["kl"] == pytest.approx(GOLDEN["distill_kl"], rel=0.02)
    assert res.validation.metrics["kl_topk"] == pytest.approx(GOLDEN["kl_topk"], rel=0.02)
    # build knows its teacher, so the full-vocabulary KL is measured; top-k KL is its lower bound
    assert res.validation.metrics["kl_full"] >= res.validation.metrics["kl_topk"] - 1e-9
    assert json.loads(json.dumps(res.to_dict()))["bundle"] == str(res.bundle)


GOLDEN = {"distill_kl": 0.031308, "kl_topk": 0.0096188}


def test_full_kl_needs_the_teacher_named_and_refuses_another(trt_build, tiny_dirs):
    _, res = trt_build
    b = Bundle.open(res.bundle)
    assert validate_bundle(b, gates=LOOSE).metrics["kl_full"] is None  # nothing read from the build host's disk
    named = validate_bundle(b, gates=LOOSE, teacher=tiny_dirs["llama"]).metrics["kl_full"]
    assert named == pytest.approx(res.validation.metrics["kl_full"], rel=1e-6)
    with pytest.raises(BundleError, match="not the teacher this bundle was distilled from"):
        validate_bundle(b, gates=LOOSE, teacher=tiny_dirs["qwen2"])


def test_out_that_is_a_file_is_refused_before_distilling(tiny_dirs, tmp_path):
    f = tmp_path / "x"
    f.write_text("not a dir")
    with pytest.raises(BundleError, match="is a file; name a directory"):
        build(_cfg(tiny_dirs["llama"]), f)
    assert not (tmp_path / "x.run").exists()
