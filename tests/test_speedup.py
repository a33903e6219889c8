import json

import pytest
import torch

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core.distill import distill
from sparsekd_deploy.speedup import ProfileError, eligible_shapes, predict, slower_layers


def test_prediction_arithmetic():
    layers = {"a": {"dense_ms": 2.0, "sparse_ms": 1.0, "speedup": 2.0},
              "b": {"dense_ms": 1.0, "sparse_ms": 1.5, "speedup": 0.67}}
    p = predict(layers, 10.0)
    assert p["predicted_sparse_ms"] == pytest.approx(9.0) and p["predicted_speedup"] == pytest.approx(10 / 9)
    assert p["layers_sparse"] == 1 and p["layers_total"] == 2


def test_sparsify_only_faster_keeps_slow_layers_dense(tiny_dirs, fast_cfg, tmp_path):
    shapes = eligible_shapes(tiny_dirs["llama"])
    slow = [n for n in shapes if n.endswith("down_proj")]
    prof = {"device": "test GPU", "target": "torch", "tokens": 4096, "layers": {
        n: {"shape_out_in": list(s), "dense_ms": 1.0, "sparse_ms": 2.0 if n in slow else 0.5,
            "speedup": 0.5 if n in slow else 2.0} for n, s in shapes.items()}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    assert set(slower_layers(path)) == set(slow)
    res = distill(build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "sparsify_only_faster": str(path)}))
    sp = json.loads((res.out / "sparsity.json").read_text())
    assert set(slow) <= set(sp["skipped"]) and "not faster than dense (0.50x on test GPU" in sp["skipped"][slow[0]]
    assert not set(slow) & set(sp["layers"])


def test_profile_errors(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        slower_layers(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ProfileError, match="not a profile.json"):
        slower_layers(tmp_path / "bad.json")


def test_profile_command_needs_gpu(tiny_dirs):
    from click.testing import CliRunner

    from sparsekd_deploy.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the gpu-marked device check runs the profile for real")
    r = CliRunner().invoke(main, ["profile", "--model", str(tiny_dirs["llama"])])
    assert r.exit_code == 2 and "no CUDA GPU" in r.output


def test_profile_refuses_a_gpu_without_sparse_tensor_cores(tiny_dirs, monkeypatch):
    # A T4 (7.5) or Xavier (7.2) has no 2:4 hardware: say so before timing anything.
    from sparsekd_deploy.speedup import profile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(ProfileError, match=r"compute capability 7\.5\) has no 2:4 sparse tensor cores"):
        profile(tiny_dirs["llama"], "torch", 1, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_on_gpu(tiny_dirs, tmp_path):
    from sparsekd_deploy.speedup import profile

    res = profile(tiny_dirs["llama"], "torch", 1, 256)
    assert res["layers"] and res["end_to_end"]["dense_ms"] > 0
