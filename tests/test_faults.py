"""Faults a user meets, through the CLI: each is one line and exit 2 (or the verdict's code), never a traceback, and
nothing is left half-written."""

import errno
import json

import pytest
from click.testing import CliRunner
from conftest import FAST, LOOSE

from sparsekd_deploy.cli import main


def run(args):
    return CliRunner().invoke(main, args)


def one_clear_line(r, code=2):
    assert r.exit_code == code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output


@pytest.fixture(scope="module")
def built(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(root / "b"), *FAST, *LOOSE])
    assert r.exit_code == 0, r.output
    return root


def _raise(err, msg):
    def boom(*a, **k):
        raise OSError(err, msg, "the-file")

    return boom


def test_full_disk_during_builds_export_leaves_nothing_half_written(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr("sparsekd_deploy.exporters.onnx._finalize", _raise(errno.ENOSPC, "No space left on device"))
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), *FAST, *LOOSE])
    one_clear_line(r)
    assert "No space left on device" in r.output and "nothing was left half-written" in r.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    assert not (tmp_path / "b.lock").exists()  # the bundle lock is released on failure


def test_export_into_a_read_only_place(pruned_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr("sparsekd_deploy.exporters.onnx._finalize", _raise(errno.EROFS, "Read-only file system"))
    r = run(["export", str(pruned_dirs["llama"]), "--out", str(tmp_path / "m.onnx")])
    one_clear_line(r)
    assert "Read-only file system" in r.output and not (tmp_path / "m.onnx").exists()


def test_export_out_is_a_directory(pruned_dirs, tmp_path):
    r = run(["export", str(pruned_dirs["llama"]), "--out", str(tmp_path), "--overwrite"])
    one_clear_line(r)
    assert "is a directory" in r.output


def test_export_ignores_a_corrupt_sparsity_json_beside_the_student(pruned_dirs, tmp_path):
    """The audit reads the student's own zeros; a damaged side file cannot break or fool it."""
    import shutil

    student = tmp_path / "run" / "student"
    shutil.copytree(pruned_dirs["llama"], student)
    (tmp_path / "run" / "sparsity.json").write_text("{not json")
    r = run(["export", str(student), "--out", str(tmp_path / "m.onnx"), "--pattern", "2:4", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["pattern_share"] == pytest.approx(1.0) and res["audit:m.onnx"]["holding"] > 0


def test_validate_on_a_read_only_bundle_prints_the_verdict_and_says_it_was_not_recorded(built, monkeypatch):
    before = (built / "b" / "validation.json").read_text()
    monkeypatch.setattr("sparsekd_deploy.bundle.write_json_atomic", _raise(errno.EROFS, "Read-only file system"))
    r = run(["validate", str(built / "b"), *LOOSE])
    one_clear_line(r, code=0)  # the exit code is still the verdict
    assert "PASS" in r.output and "not recorded" in r.output
    assert (built / "b" / "validation.json").read_text() == before


def test_interrupted_validate_gives_no_resume_hint(built, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("sparsekd_deploy.validate.validator.validate_bundle", interrupt)
    r = run(["validate", str(built / "b")])
    assert r.exit_code == 130 and "interrupted" in r.output and "--resume" not in r.output


def test_rebuild_with_resume_on_a_replaced_run_dir(built, tiny_dirs, tmp_path):
    import shutil

    shutil.copytree(built / "b.run", tmp_path / "b.run")  # the run dir of a bundle that was deleted since
    (tmp_path / "b.run" / "data.safetensors").unlink()
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), "--resume", *FAST, *LOOSE])
    one_clear_line(r)
    assert "has no data.safetensors" in r.output and not (tmp_path / "b").exists()


def test_build_that_stops_short_of_its_target_says_so_not_pattern_lost(tiny_dirs, tmp_path):
    args = [a if a != "50" else "1e-9" for a in FAST]  # a KL budget no stage can meet
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), *args, *LOOSE])
    one_clear_line(r, code=1)
    assert "target 2:4 not reached" in r.output and "pattern lost" not in r.output
    assert "--kl-budget" in r.output  # and which flags would reach it
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["distillation"]["reached_target"] is False


def test_rebuild_after_deleting_the_bundle_reuses_its_run_or_names_what_changed(built, tiny_dirs, tmp_path):
    """Item 7: the run sits beside the bundle (b.run); a rebuild with the same flags reuses it, other flags are named."""
    import shutil

    shutil.copytree(built / "b.run", tmp_path / "b.run")  # the bundle b was deleted, its run stayed
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), *FAST, *LOOSE])
    assert r.exit_code == 0, r.output
    assert "reusing the finished distillation run" in r.output
    shutil.rmtree(tmp_path / "b")
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), *FAST, *LOOSE, "--lr", "1e-3"])
    one_clear_line(r)
    assert "lr=0.0005 (now 0.001)" in r.output and "--overwrite" in r.output


def test_full_disk_during_distill_is_one_line_and_leaves_no_output(tiny_dirs, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    monkeypatch.setattr("sparsekd_deploy.core.rundir.save_file", full)
    r = run(["distill", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "run"), *FAST])
    one_clear_line(r)
    assert "No space left on device" in r.output and "nothing was left half-written" in r.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.lock").exists()


def test_manifest_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text("{garbage")
    for cmd in ("inspect", "validate"):
        r = run([cmd, str(tmp_path)])
        one_clear_line(r)
        assert "manifest.json is not valid JSON" in r.output


def test_validate_on_a_read_only_file_system_still_prints_the_verdict(built, monkeypatch):
    """The plots are written first; on a read-only mount they fail with EROFS before validation.json does."""
    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", "validation/kl_per_prompt.png")

    monkeypatch.setattr("sparsekd_deploy.validate.report.plot", ro)
    r = run(["validate", str(built / "b"), *LOOSE])
    one_clear_line(r, code=0)
    assert "PASS" in r.output and "not recorded" in r.output


@pytest.mark.parametrize("damage,message", [
    (lambda m: m.update(teacher=["x"]), "is not the teacher"),
    (lambda m: m.update(engine="engine.plan"), "engine section is malformed"),
])
def test_malformed_manifest_sections_are_one_line(built, tmp_path, tiny_dirs, damage, message):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(built / "b", b)
    m = json.loads((b / "manifest.json").read_text())
    damage(m)
    (b / "manifest.json").write_text(json.dumps(m))
    args = ["--teacher", str(tiny_dirs["llama"])] if "teacher" in message else ["--runtime", "tensorrt"]
    r = run(["validate", str(b), *args])
    one_clear_line(r)
    assert message in r.output


def test_references_that_load_but_lack_fields_are_one_line(built, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(built / "b", b)
    (b / "references" / "references.json").write_text("{}")
    from sparsekd_deploy.bundle import file_table

    m = json.loads((b / "manifest.json").read_text())
    m["files"] = file_table(b)  # checksums recomputed: only the shape check can catch it
    (b / "manifest.json").write_text(json.dumps(m))
    r = run(["validate", str(b)])
    one_clear_line(r)
    assert "lack or mistype key prefix" in r.output


def test_a_manifest_path_with_a_nul_byte_is_refused(tmp_path):
    from sparsekd_deploy.bundle import BundleError, confined

    with pytest.raises(BundleError, match="is not a file name"):
        confined(tmp_path, "a\x00b", "file")


@pytest.mark.parametrize("cmd", ["build", "distill"])
def test_out_dot_is_refused_in_one_line(cmd, tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run([cmd, "--teacher", str(tiny_dirs["llama"]), "--out", ".", *FAST])
    one_clear_line(r)
    assert "relative step" in r.output and list(tmp_path.iterdir()) == []


def test_rebuild_over_a_run_with_a_damaged_summary_is_one_line(built, tiny_dirs, tmp_path):
    import shutil

    shutil.copytree(built / "b.run", tmp_path / "b.run")
    (tmp_path / "b.run" / "summary.json").write_text("{half")
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), *FAST, *LOOSE])
    one_clear_line(r)
    assert "summary.json is missing or damaged" in r.output and "--overwrite" in r.output


@pytest.fixture(scope="module")
def finished_run(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    r = run(["distill", "--teacher", str(tiny_dirs["llama"]), "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    return out


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set_state(run_dir, **values):
    state = json.loads((run_dir / "state.json").read_text())
    state.update(values)
    (run_dir / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("damage,message", [
    (lambda d, t: _cut(d / "checkpoints" / "stage-1" / "model.safetensors"), "checkpoints/stage-1 (accepted stage 1)"),
    (lambda d, t: (d / "checkpoints" / "stage-1" / "masks.safetensors").unlink(), "masks.safetensors"),
    (lambda d, t: _cut(d / "data.safetensors"), "data.safetensors is missing or damaged"),
    (lambda d, t: _set_state(d, accepted="1"), "accepted is '1', not a stage number"),
    (lambda d, t: _set_state(d, trajectory=None), "trajectory is NoneType"),
    (lambda d, t: __import__("shutil").copy(t["gpt2"] / "model.safetensors", d / "checkpoints" / "stage-1"),
     "does not fit the teacher's architecture"),
])
def test_resume_from_a_damaged_run_dir_is_one_line(finished_run, tiny_dirs, tmp_path, damage, message):
    """An interrupted run (accepted stage 1) whose checkpoint, data or state was cut or replaced: one line naming
    the file and --overwrite, never a safetensors traceback, and never a silent resume from the teacher's weights."""
    import shutil

    partial = tmp_path / "run.partial"
    shutil.copytree(finished_run, partial)
    _set_state(partial, accepted=1, status="running")
    damage(partial, tiny_dirs)
    r = run(["distill", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "run"), "--resume", *FAST])
    one_clear_line(r)
    assert "cannot be resumed" in r.output and message in r.output and "--overwrite" in r.output
    assert not (tmp_path / "run").exists()


def test_export_that_fails_after_the_graph_is_written_leaves_no_onnx(pruned_dirs, tmp_path):
    """The quantize step fails (no calibration data beside this student) after model.onnx and its FP16 copy exist:
    nothing may stay at --out that a later command would take for a good export."""
    r = run(["export", str(pruned_dirs["llama"]), "--out", str(tmp_path / "out" / "m.onnx"), "--fp16",
             "--quantize", "int8"])
    one_clear_line(r)
    assert "calibrates on 32 training sequences" in r.output
    assert list((tmp_path / "out").iterdir()) == []


def test_export_of_a_student_with_cut_weights_is_one_line(pruned_dirs, tmp_path):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(pruned_dirs["llama"], student)
    _cut(student / "model.safetensors")
    r = run(["export", str(student), "--out", str(tmp_path / "m.onnx")])
    one_clear_line(r)
    assert "model.safetensors is not a readable safetensors file" in r.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("opset", ["13", "99"])
def test_an_opset_the_exporter_cannot_write_is_refused_before_the_distillation(tiny_dirs, pruned_dirs, tmp_path, opset):
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), "--opset", opset, *FAST])
    one_clear_line(r)
    assert f"--opset {opset}: the exporter writes opsets 14 to" in r.output
    assert list(tmp_path.iterdir()) == []  # no run dir: refused before any distillation
    r = run(["export", str(pruned_dirs["llama"]), "--out", str(tmp_path / "m.onnx"), "--opset", opset])
    one_clear_line(r)
    assert f"--opset {opset}: the exporter writes opsets 14 to" in r.output and list(tmp_path.iterdir()) == []


def test_a_workspace_below_one_mib_is_refused(tiny_dirs, tmp_path):
    """It would otherwise be written into the bundle's engine_build.json line and fail on the device."""
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), "--target", "tensorrt",
             "--workspace", "-1", *FAST])
    one_clear_line(r)
    assert "--workspace" in r.output and list(tmp_path.iterdir()) == []
    r = run(["engine", "build", str(tmp_path), "--workspace", "0"])
    one_clear_line(r)
    assert "--workspace" in r.output


def test_full_disk_while_writing_the_teacher_cache_is_one_line_not_a_crash(tiny_dirs, tmp_path, monkeypatch):
    """The cache is written through memmaps of sparse files: on a full disk (a 300 KiB tmpfs, tried by hand) a store
    into an unbacked page killed the process with SIGBUS, leaving *.npy.tmp files and a stale lock. The files are now
    allocated first, which fails as ENOSPC; the allocation is what this test makes fail."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", full, raising=False)
    cache = tmp_path / "cache"
    r = run(["distill", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "run"), "--teacher-access",
             "topk:8", "--teacher-cache", str(cache), *FAST])
    one_clear_line(r)
    assert "No space left on device" in r.output and ".npy.tmp" in r.output
    assert list(cache.iterdir()) == [] and not (tmp_path / "run").exists() and not (tmp_path / "run.lock").exists()


@pytest.mark.parametrize("cmd", ["distill", "build"])
def test_a_run_dir_that_is_a_file_is_refused_even_with_overwrite(cmd, tiny_dirs, tmp_path):
    """--overwrite swapped the file out for a run dir and left it behind as <name>.old-<pid>."""
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    where = ["--out", str(f)] if cmd == "distill" else ["--out", str(tmp_path / "b"), "--run-dir", str(f)]
    r = run([cmd, "--teacher", str(tiny_dirs["llama"]), *where, "--overwrite", *FAST, *(LOOSE if cmd == "build" else [])])
    one_clear_line(r)
    assert "is a file; name a directory for the run" in r.output
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_cut_data_file_of_a_finished_run_is_one_line_for_build_and_export(built, tiny_dirs, tmp_path):
    import shutil

    shutil.copytree(built / "b.run", tmp_path / "b.run")
    _cut(tmp_path / "b.run" / "data.safetensors")
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), *FAST, *LOOSE])
    one_clear_line(r)  # the rebuild reuses the finished run, then reads its token ids
    assert "data.safetensors (the run's token ids) is missing or damaged" in r.output and not (tmp_path / "b").exists()
    r = run(["export", str(tmp_path / "b.run" / "student"), "--out", str(tmp_path / "m.onnx"), "--quantize", "int8",
             "--calibration-samples", "4"])
    one_clear_line(r)  # static quantization calibrates on the same file
    assert "data.safetensors (the run's token ids) is missing or damaged" in r.output
    assert not (tmp_path / "m.onnx").exists()


def test_more_dense_layers_than_the_model_has_leaves_no_run_to_resume(tiny_dirs, tmp_path):
    """It was refused only after the run had saved its first state, so the corrected command then met 'an interrupted
    run is in run.partial' and, with --resume, 'was started with dense_layers=999'."""
    r = run(["distill", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "run"), "--dense-layers", "999",
             *FAST])
    one_clear_line(r)
    assert "--dense-layers 999: the model has 14 prunable layers; pass 0..14 or auto" in r.output
    assert list(tmp_path.iterdir()) == []


def test_json_stdout_holds_only_the_document_whatever_a_library_prints():
    # A library that print()s while a --json command runs (ORT's fusers did) would put a line before the JSON.
    import click

    from sparsekd_deploy.commands.error_handling import handle_errors
    from sparsekd_deploy.console import stdout_json

    @click.command()
    @click.option("--json", "as_json", is_flag=True)
    @handle_errors
    def chatty(as_json):
        print("failed in shape inference <class 'AssertionError'>")
        stdout_json({"ok": True})

    r = CliRunner().invoke(chatty, ["--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"ok": True}
    assert "failed in shape inference" in r.stderr  # moved to stderr, not lost
    r = CliRunner().invoke(chatty, [])  # without --json, stdout is the user's terminal as before
    assert r.stdout.startswith("failed in shape inference")


def test_ctrl_c_while_a_build_validates_names_the_written_bundle_and_the_validate_line(built, tiny_dirs, tmp_path,
                                                                                     monkeypatch):
    # The bundle is committed before validation starts; the generic hint ("rerun with --resume") was refused there
    # ("bundle dir exists").
    import importlib
    import shutil

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    shutil.copytree(built / "b.run", tmp_path / "b.run")
    monkeypatch.setattr(importlib.import_module("sparsekd_deploy.pipeline.build"), "_validate_on_target", ctrl_c)
    r = run(["build", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"), *FAST, *LOOSE])
    one_clear_line(r, code=130)
    assert "rerun with --resume" not in r.output and "is written but not validated" in r.output
    line = r.stderr.split("; run ", 1)[1].strip().split()
    assert line[:3] == ["sparsekd-deploy", "validate", str(tmp_path / "b")] and "--min-top1" in line
    monkeypatch.undo()
    r = run(line[1:])  # the line it printed validates the bundle against the build's gates
    assert r.exit_code == 0, r.output


def test_the_interrupted_builds_validate_line_carries_every_gate_it_was_given(tmp_path):
    """The line printed after a Ctrl-C during validation repeats the build's gates, --no-determinism-gate too (it
    was left out: the printed command then failed an int8-dynamic bundle the build would have passed)."""
    from sparsekd_deploy.pipeline.build import _validate_line
    from sparsekd_deploy.validate.gate import Gates

    line = _validate_line(tmp_path / "b", Gates(min_top1=0.5, require_determinism=False)).split()
    assert line == ["sparsekd-deploy", "validate", str(tmp_path / "b"), "--min-top1", "0.5", "--no-determinism-gate"]
    assert _validate_line(tmp_path / "b", Gates()).split() == ["sparsekd-deploy", "validate", str(tmp_path / "b")]
