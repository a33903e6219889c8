"""build → validate → inspect on a tiny Llama, through the CLI, as a user runs it."""

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import FAST, LOOSE

from sparsekd_deploy.cli import main

# kl_topk / top1 on the references' 16 prompts (8 before the confidence measurement was given as many prompts as
# the jitter: 0.0096188 / 0.3672)
GOLDEN = {"distill_kl": 0.031308, "kl_topk": 0.0096322, "top1": 0.3379}


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def bundle(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    r = run(["build", "--target", "onnxruntime", "--teacher", str(tiny_dirs["llama"]), "--out", str(root / "b"),
             "--run-dir", str(root / "run"), "--fp16", "--json", *FAST, *LOOSE])
    assert r.exit_code == 0, r.output
    return root / "b", json.loads(r.stdout[r.stdout.index("{"):])


def test_bundle_layout_and_manifest(bundle):
    path, res = bundle
    m = json.loads((path / "manifest.json").read_text())
    for f in ("model.onnx", "model.fp16.onnx", "references/references.safetensors", "references/references.json",
              "sparsity.json", "trajectory.json", "trajectory.png", "audit.json", "parity.json", "config.json"):
        assert f in m["files"], f
    assert m["model"]["with_past"] and m["model"]["exporter"] == "optimum"
    audit = json.loads((path / "audit.json").read_text())
    for graph in ("model.onnx", "model.fp16.onnx"):
        assert audit[graph]["holding"] == audit[graph]["checked"] > 0
    assert m["parity"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    v = res["validation"]
    assert v["passed"] and {g["gate"] for g in v["gates"]} >= {"kl_topk", "top1_agreement", "consistency_ratio"}
    # seeded golden values of this run (tiny Llama, FAST, seed 0): the gates above are loose, these are not
    assert res["distillation"]["kl"] == pytest.approx(GOLDEN["distill_kl"], rel=0.02)
    assert v["metrics"]["kl_topk"] == pytest.approx(GOLDEN["kl_topk"], rel=0.02)
    assert v["metrics"]["top1_agreement"] == pytest.approx(GOLDEN["top1"], abs=0.02)
    assert 0 <= v["metrics"]["top1_agreement"] <= 1 and v["metrics"]["deterministic"]
    # the teacher is present here, so the full-vocabulary KL is reported; the top-k KL is its lower bound
    assert v["metrics"]["kl_full"] >= v["metrics"]["kl_topk"] - 1e-6
    assert (path / "validation" / "kl_per_prompt.png").is_file() and (path / "validation" / "consistency.png").is_file()


def test_validate_exit_codes(bundle, tmp_path):
    path, _ = bundle
    assert run(["validate", str(path), *LOOSE]).exit_code == 0
    r = run(["validate", str(path), "--max-kl", "1e-9", "--json"])
    assert r.exit_code == 1
    report = json.loads(r.stdout[r.stdout.index("{"):])
    assert not report["passed"] and not next(g for g in report["gates"] if g["gate"] == "kl_topk")["passed"]
    r = run(["validate", str(path), "--min-top1", "1.5"])
    assert r.exit_code == 2 and "--min-top1 must lie in [0, 1]" in r.output
    r = run(["validate", str(path), "--provider", "tensorrt"])
    assert r.exit_code == 2 and "not available" in r.output


def test_inspect(bundle):
    path, _ = bundle
    r = run(["inspect", str(path)])
    assert r.exit_code == 0 and "2:4" in r.output and "last validation" in r.output
    r = run(["inspect", str(path), "--json"])
    assert json.loads(r.stdout)["manifest"]["pattern"] == "2:4"


def test_bad_bundles_exit_2_and_nothing_overwritten(bundle, tmp_path):
    path, _ = bundle
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    before = (broken / "validation.json").read_bytes()
    r = run(["validate", str(broken)])
    assert r.exit_code == 2 and "truncated" in r.output and "Traceback" not in r.output
    assert (broken / "validation.json").read_bytes() == before
    (broken / "model.onnx").write_bytes(data)
    (broken / "references" / "references.json").unlink()
    r = run(["validate", str(broken)])
    assert r.exit_code == 2 and "references/references.json is missing" in r.output
    m = json.loads((broken / "manifest.json").read_text())
    m["schema_version"] = 7
    (broken / "manifest.json").write_text(json.dumps(m))
    r = run(["inspect", str(broken)])
    assert r.exit_code == 2 and "schema version 7" in r.output
    r = run(["validate", str(tmp_path)])
    assert r.exit_code == 2 and "not a bundle" in r.output


def test_export_command(pruned_dirs, tmp_path):
    out = tmp_path / "m.onnx"
    r = run(["export", str(pruned_dirs["gpt2"]), "--format", "onnx", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["export"]["exporter"] == "optimum" and res["audit:m.onnx"]["holding"] == res["audit:m.onnx"]["checked"]
    r = run(["export", str(pruned_dirs["gpt2"]), "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = run(["export", str(tmp_path), "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "no config.json" in r.output


def test_build_refuses_existing_bundle(bundle, tiny_dirs):
    path, _ = bundle
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(path), *FAST])
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_build_tensorrt_without_gpu_writes_device_step(device_step_bundle):
    path, output, res = device_step_bundle
    assert res["engine"]["status"] == "to be built on the device"
    m = json.loads((path / "manifest.json").read_text())
    assert "engine.plan" not in m["files"] and "engine" not in m  # no engine is faked
    assert "model.fp16.onnx" in m["files"] and "engine_build.json" in m["files"]
    step = json.loads((path / "engine_build.json").read_text())
    assert step["python_builder"][:3] == ["sparsekd-deploy", "engine", "build"]
    assert "--batch" in step["python_builder"] and "1,2,4" in step["python_builder"]
    v10 = step["trtexec_tensorrt10"]
    assert "--sparsity=enable" in v10 and "--fp16" in v10
    assert any(a.startswith("--maxShapes=") and "input_ids:4x32" in a and "attention_mask:4x64" in a for a in v10)
    assert "--stronglyTyped" in step["trtexec_tensorrt11"] and "--onnx=model.fp16.onnx" in step["trtexec_tensorrt11"]
    assert step["trtexec_register"][:3] == ["sparsekd-deploy", "engine", "add"]
    assert "engine will be built on the device" in output
    # The printed commands are whole lines (copy-paste safe), with the bundle filled in.
    assert any(line.strip().startswith("sparsekd-deploy engine build ") and str(path) in line and "--past 0,16,32" in line
               for line in output.splitlines())
    assert any(line.strip().startswith("trtexec --onnx=model.onnx") and line.rstrip().endswith("> trtexec.log 2>&1")
               for line in output.splitlines())
    r = run(["validate", str(path), "--runtime", "tensorrt"])
    assert r.exit_code == 2 and "no engine yet" in r.output
    r = run(["inspect", str(path)])
    assert r.exit_code == 0 and "built on the device" in r.output


def test_build_rejects_bad_profile_before_work(tiny_dirs, tmp_path):
    r = run(["build", "--target", "tensorrt", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"),
             "--batch", "4,1,8", *FAST])
    assert r.exit_code == 2 and "min 4 > opt 1" in r.output
    assert not (tmp_path / "b").exists()


def test_build_resume_reuses_a_finished_run(bundle, tiny_dirs):
    path, _ = bundle
    run_dir = path.parent / "run"
    before = (run_dir / "student" / "model.safetensors").stat().st_mtime_ns
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(path), "--run-dir", str(run_dir),
             "--resume", "--overwrite", *FAST, *LOOSE])
    assert r.exit_code == 0, r.output
    assert "reusing the finished distillation run" in r.output
    # --overwrite was given and the run was reused: the note must not say that --overwrite redoes it
    assert "--overwrite without --resume redoes it" in " ".join(r.output.split())
    assert (run_dir / "student" / "model.safetensors").stat().st_mtime_ns == before


def test_validate_names_unlisted_files_and_refuses_a_link_out(bundle, tmp_path, monkeypatch):
    """validate said nothing about files the manifest does not list: strays inside (a regular file, a link to a
    listed file) are named in one note and the verdict stands; a link out of the bundle is one line, exit 2, before
    anything is validated or recorded. The bundle is walked once (verification's scan, reused by the note)."""
    import os

    path, _ = bundle
    copy = tmp_path / "b"
    shutil.copytree(path, copy, symlinks=True)
    (copy / "timing.cache").write_bytes(b"trtexec's")
    (copy / "alias.onnx").symlink_to("model.onnx")
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top, *a, **k: walks.append(str(top)) or real_walk(top, *a, **k))
    r = run(["validate", str(copy), "--no-plots", *LOOSE])
    assert r.exit_code == 0, r.output
    assert walks.count(str(copy)) == 1, walks
    assert ("note: 2 file(s) in the bundle that its manifest does not list (no checksum covers them; tolerated as "
            "strays): alias.onnx (symlink to model.onnx), timing.cache") in r.stderr
    before = (copy / "validation.json").read_bytes()
    (copy / "references" / "more.json").symlink_to(tmp_path / "elsewhere.json")
    r = run(["validate", str(copy), *LOOSE])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "unlisted 'references/more.json' leads out of the bundle" in r.output
    assert (copy / "validation.json").read_bytes() == before
