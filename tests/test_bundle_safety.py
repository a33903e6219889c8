"""A bundle is untrusted input: its paths stay inside it, a malformed manifest or report is one clear BundleError,
and a read-only bundle is said to be read-only (nothing half-written). Bundles are made by hand with BundleWriter."""

import errno
import json
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from sparsekd_deploy import fsutil
from sparsekd_deploy.bundle import Bundle, BundleError, BundleReadOnlyError, BundleWriter, file_table, sha256_file
from sparsekd_deploy.cli import main

# Every section `inspect` shows, as `build` writes them.
FULL = {
    "name": "b",
    "model": {"onnx": "model.onnx", "onnx_fp16": None, "architecture": "llama", "exporter": "torch.onnx",
              "opset": 17, "with_past": True},
    "student": {"parameters": {"student": 1000, "teacher": 2000}},
    "pattern": "2:4", "achieved_sparsity": 0.5,
    "distillation": {"status": "done", "reason": "", "reached_target": True, "final_stage": 2, "stages": 2,
                     "kl": 0.1, "top1": 0.9},
    "target": {"runtime": "onnxruntime"}, "parity": {},
}


def make(root, extra=None, name="b"):
    w = BundleWriter(root / name)
    (w.dir / "model.onnx").write_bytes(b"\x08\x01" * 100)
    for rel, data in (extra or {}).items():
        (w.dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (w.dir / rel).write_bytes(data)
    return w.commit(FULL)


def edit_manifest(path, fn):
    """Rewrite manifest.json (it is outside its own checksums, so the result is checksum-valid). ``fn`` edits the
    dict in place; a list it returns replaces the whole manifest."""
    m = json.loads((path / "manifest.json").read_text())
    new = fn(m)
    m = new if isinstance(new, list) else m
    (path / "manifest.json").write_text(json.dumps(m))


def entry(p):
    return {"sha256": sha256_file(p), "bytes": p.stat().st_size}


def inspect(*args):
    return CliRunner().invoke(main, ["inspect", *map(str, args)], env={"COLUMNS": "250"})


# --- A: paths confined to the bundle -------------------------------------------------------------------------------


def test_manifest_entry_climbing_out_is_refused(tmp_path):
    path = make(tmp_path / "outer")
    outside = tmp_path / "x"
    outside.write_text("not part of the bundle")
    assert (path / "../../x").resolve() == outside.resolve()
    edit_manifest(path, lambda m: m["files"].update({"../../x": entry(outside)}))  # its checksum is right
    with pytest.raises(BundleError, match=r"'\.\./\.\./x' climbs out of the bundle"):
        Bundle.open(path)


def test_model_symlinked_out_of_the_bundle_is_refused(tmp_path):
    path = make(tmp_path, {"graphs/model.v2.onnx": b"\x08\x02" * 10})
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(b"someone else's model")
    (path / "alias.onnx").symlink_to("graphs/model.v2.onnx")  # a link that stays inside is fine
    (path / "model.onnx").unlink()
    (path / "model.onnx").symlink_to(outside)
    edit_manifest(path, lambda m: m.update(files=file_table(path)))  # checksums recomputed: only confinement catches it
    with pytest.raises(BundleError, match=r"'model.onnx' leads out of the bundle \(a symlink to .*elsewhere.onnx\)"):
        Bundle.open(path)
    b = Bundle.open(path, verify=False)
    with pytest.raises(BundleError, match="leads out of the bundle"):
        _ = b.model_path
    assert b.file("alias.onnx") == path / "alias.onnx"


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_model_path_outside_the_bundle_is_never_opened(tmp_path, where):
    path = make(tmp_path / "outer")
    secret = tmp_path / "secret"
    secret.write_text("root:x:0:0")
    rel = str(secret) if where == "absolute" else "../../secret"
    edit_manifest(path, lambda m: (m["model"].update(onnx=rel), m["files"].update({rel: entry(secret)})))
    with pytest.raises(BundleError, match="absolute path" if where == "absolute" else "climbs out"):
        Bundle.open(path)
    with pytest.raises(BundleError, match=f"file '{rel}' (is an absolute path|climbs out)"):
        _ = Bundle.open(path, verify=False).model_path


def test_validation_dir_symlinked_out_gets_nothing(tmp_path):
    path = make(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (path / "validation").symlink_to(elsewhere)
    b = Bundle.open(path)
    with pytest.raises(BundleError, match="'validation' leads out of the bundle"):
        b.writable_dir("validation")
    assert list(elsewhere.iterdir()) == []
    # A real validation/ holding a planted link to a file outside is refused too (plots would be written through it).
    (path / "validation").unlink()
    (path / "validation").mkdir()
    (path / "validation" / "kl_per_prompt.png").symlink_to(elsewhere / "victim")
    with pytest.raises(BundleError, match="'validation/kl_per_prompt.png' leads out of the bundle"):
        b.writable_dir("validation")
    # A link that stays inside the bundle is allowed.
    (path / "validation").rename(path / "plots")
    (path / "plots" / "kl_per_prompt.png").unlink()
    (path / "validation").symlink_to("plots")
    assert b.writable_dir("validation") == path / "validation"
    assert b.writable_dir("new/sub").is_dir()


def test_write_validation_does_not_write_through_a_planted_tmp_link(tmp_path):
    path = make(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (path / "validation.json.tmp").symlink_to(victim)
    Bundle.open(path).write_validation({"passed": True})
    assert victim.read_text() == "precious"
    assert json.loads((path / "validation.json").read_text()) == {"passed": True}
    assert not (path / "validation.json.tmp").exists()


def test_add_files_refuses_a_destination_outside(tmp_path):
    path = make(tmp_path / "outer")
    src = tmp_path / "new.bin"
    src.write_bytes(b"data")
    b = Bundle.open(path)
    with pytest.raises(BundleError, match="climbs out"):
        b.add_files({"../escaped.bin": src}, {})
    assert src.exists() and not (tmp_path / "outer" / "escaped.bin").exists()
    assert "../escaped.bin" not in Bundle.open(path).manifest["files"]


# --- B: malformed but checksum-valid manifests and reports ----------------------------------------------------------


def _drop(section, key=None):
    def fn(m):
        (m[section]["model.onnx"] if key else m).pop(key or section)
    return fn


@pytest.mark.parametrize("mutate,needle", [
    (_drop("files", "bytes"), "files['model.onnx'] has no 'bytes'"),
    (_drop("files", "sha256"), "files['model.onnx'] has no 'sha256'"),
    (lambda m: m.update(files=list(m["files"])), "'files' is a JSON list, not an object"),
    (lambda m: [m], "is a JSON list, not an object; it is not a bundle manifest"),
    (_drop("model"), "no 'model' section"),
    (lambda m: m.update(model="model.onnx"), "'model' is a JSON string, not an object"),
    (lambda m: m["files"]["model.onnx"].update(bytes="200"), "files['model.onnx'].bytes is '200', not a byte count"),
])
def test_malformed_manifest_is_one_bundle_error(tmp_path, mutate, needle):
    path = make(tmp_path)
    edit_manifest(path, mutate)
    with pytest.raises(BundleError) as e:
        Bundle.open(path)
    assert f"{path / 'manifest.json'} " in str(e.value) and needle in str(e.value)


def test_inspect_names_a_missing_section(tmp_path):
    path = make(tmp_path)
    r = inspect(path)
    assert r.exit_code == 0 and "never validated" in r.output, r.output
    edit_manifest(path, lambda m: m.pop("distillation"))
    r = inspect(path)
    assert r.exit_code == 2 and "manifest.json has no distillation.reached_target" in r.output, r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("text,needle", [
    ('{"passed": tru', "validation.json is not valid JSON"),
    ("[1, 2]", "validation.json is a JSON list, not a validation report"),
])
def test_inspect_corrupt_validation_json(tmp_path, text, needle):
    path = make(tmp_path)
    (path / "validation.json").write_text(text)
    for args in ([path], [path, "--json"]):
        r = inspect(*args)
        assert r.exit_code == 2 and needle in r.output and "delete it and rerun" in r.output, r.output


def test_garbage_references_name_the_file(tmp_path):
    from sparsekd_deploy.validate.references import META, TENSORS, References

    good_json = json.dumps({"top_k": 4}).encode()
    b = Bundle.open(make(tmp_path, {TENSORS: b"\x00garbage" * 64, META: good_json}, name="b1"))
    with pytest.raises(BundleError, match="references/references.safetensors is not a readable safetensors file"):
        References.load(b)
    tensors = tmp_path / "t.safetensors"
    save_file({"input_ids": np.zeros((1, 4), np.int64)}, str(tensors))
    b = Bundle.open(make(tmp_path, {TENSORS: tensors.read_bytes(), META: b"{not json"}, name="b2"))
    with pytest.raises(BundleError, match="references/references.json is not valid JSON"):
        References.load(b)


# --- C: read-only bundles and atomic writes ------------------------------------------------------------------------


def test_write_validation_on_a_read_only_filesystem(tmp_path, monkeypatch):
    path = make(tmp_path)
    real_replace = os.replace

    def erofs(src, dst):
        if str(dst).endswith("validation.json"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", erofs)
    with pytest.raises(BundleReadOnlyError, match="is not writable \\(Read-only file system\\): the verdict was not "
                                                  "recorded in validation.json"):
        Bundle.open(path).write_validation({"passed": True})
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]  # no .tmp left behind


def test_write_validation_without_permission(tmp_path, monkeypatch):
    path = make(tmp_path)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fsutil.os, "open", denied)
    with pytest.raises(BundleReadOnlyError, match="not writable \\(Permission denied\\)"):
        Bundle.open(path).write_validation({"passed": True})
    assert not (path / "validation.json").exists()


def test_write_json_atomic_removes_its_tmp_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.mkdir()
    (target / "keep").write_text("a directory cannot be replaced by a file")
    with pytest.raises(OSError):
        fsutil.write_json_atomic(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.parametrize("key,rel", [("onnx", "../../../etc/passwd"), ("onnx_int8_dynamic", "/etc/passwd"),
                                     ("onnx_fp16", "model.fp16.onnx")])
def test_a_graph_the_manifest_names_but_does_not_list_fails_verification(tmp_path, key, rel):
    """inspect / report verify the bundle and said nothing about a model path outside it (or unlisted, so never
    checksummed); only validate refused it, when it came to load the graph."""
    path = make(tmp_path / "outer")
    edit_manifest(path, lambda m: m["model"].update({key: rel}))
    with pytest.raises(BundleError, match=rf"failed verification: model.{key} names '{re.escape(rel)}', which the "
                                          "files table does not list"):
        Bundle.open(path)


# --- E: an empty --model is a mistake, not the default graph ---------------------------------------------------------


def test_validate_with_an_empty_model_is_one_line_not_model_onnx(tmp_path):
    """`validate --model ''` fell back to model.onnx (``if model:``) and validated a graph nobody named; it is refused
    before anything is read, in one line, exit 2 — and so is a blank one."""
    path = make(tmp_path)
    for empty in ("", "  "):
        r = CliRunner().invoke(main, ["validate", str(path), "--model", empty])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert r.output.count("\n") == 1 and r.output.startswith(f"error: --model is empty ({empty!r}): name a file "
                                                                  "of the bundle"), r.output
        assert "fp32, fp16, int8-dynamic, int8, int4-weight, fp8" in r.output
    assert not (path / "validation.json").exists()


def test_profile_with_an_empty_model_dir_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Path('') is this directory: it must not be profiled
    r = CliRunner().invoke(main, ["profile", "--model", ""])
    assert r.exit_code == 2 and r.output.startswith("error: --model is empty ('')"), r.output
    assert not (tmp_path / "profile.json").exists()


# --- F: what the manifest does not list ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_an_unlisted_symlink_leading_out_fails_verification_unread(tmp_path, monkeypatch, kind):
    """A symlink the manifest does not list, planted where a directory is loaded whole (student/), pointing out of
    the bundle: verification passed it (only listed files were checked), so inspect and validate said nothing and a
    loader globbing student/*.safetensors would have read the file outside. Refused in one line; the link is never
    followed: nothing outside is hashed, and a linked directory is not entered."""
    import sparsekd_deploy.bundle as bundle_mod

    path = make(tmp_path, {"student/model.safetensors": b"w" * 8})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"someone else's weights")
    link = path / "student" / ("extra.safetensors" if kind == "file" else "more")
    link.symlink_to(outside / "secret.safetensors" if kind == "file" else outside)
    hashed = []
    real_sha = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: hashed.append(str(p)) or real_sha(p))
    rel = link.relative_to(path).as_posix()
    with pytest.raises(BundleError, match=rf"failed verification: unlisted '{rel}' leads out of the bundle \(a "
                                          rf"symlink to .*elsewhere.*\): remove it$"):
        Bundle.open(path)
    assert hashed and not any("elsewhere" in h for h in hashed)
    assert Bundle.open(path, verify=False).unlisted() == {rel: os.readlink(link)}
    r = inspect(path)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and f"unlisted '{rel}' leads out" in r.output, r.output
    assert "secret" not in r.output or kind == "file"  # the linked directory was not walked


def test_unlisted_files_inside_are_tolerated_and_shown(tmp_path):
    """Unlisted regular files are strays a tool may leave (engine add keeps trtexec's timing cache out of the table):
    they never failed verification, and an unlisted symlink that stays inside the bundle is treated the same way. Both
    are now named by inspect (validate prints the same note); the mutable validation records are not strays."""
    path = make(tmp_path, {"graphs/model.v2.onnx": b"\x08\x02" * 10})
    (path / "timing.cache").write_bytes(b"cache")
    (path / "alias.onnx").symlink_to("graphs/model.v2.onnx")
    (path / "validation").mkdir()
    (path / "validation" / "kl_per_prompt.png").write_bytes(b"png")
    b = Bundle.open(path)
    assert b.unlisted() == {"alias.onnx": "graphs/model.v2.onnx", "timing.cache": None}
    r = inspect(path)
    assert r.exit_code == 0, r.output
    assert ("2 file(s) in the bundle that its manifest does not list (no checksum covers them; tolerated as strays): "
            "alias.onnx (symlink to graphs/model.v2.onnx), timing.cache") in r.output
    with pytest.raises(BundleError, match="has no alias.onnx"):
        b.file("alias.onnx")  # unlisted: never opened through the bundle
    assert Bundle.open(make(tmp_path, name="clean")).unlisted() == {}
    assert "unlisted" not in inspect(tmp_path / "clean").output


def test_inspect_walks_the_bundle_once(tmp_path, monkeypatch):
    """Verification's scan for unlisted links and inspect's note on unlisted files were two walks of the whole bundle
    (a bundle of shards walked twice per command): the note reuses what verification found. With --no-verify the
    note walks, once; the same strays are named either way, and a link out is still refused in one line."""
    path = make(tmp_path, {"graphs/model.v2.onnx": b"\x08\x02" * 10})
    (path / "timing.cache").write_bytes(b"cache")
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top, *a, **k: walks.append(str(top)) or real_walk(top, *a, **k))
    for flags in ([], ["--no-verify"]):
        walks.clear()
        r = inspect(path, *flags)
        assert r.exit_code == 0, r.output
        assert "1 file(s) in the bundle that its manifest does not list" in r.output and "timing.cache" in r.output
        assert walks == [str(path)], (flags, walks)
    (path / "graphs" / "out.onnx").symlink_to(tmp_path)
    walks.clear()
    r = inspect(path)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "unlisted 'graphs/out.onnx' leads out" in r.output
    assert walks == [str(path)]


def test_adding_files_drops_the_verified_strays(tmp_path):
    """A stray that add_files lists is no longer unlisted: the note verification left behind is not reused."""
    path = make(tmp_path)
    (path / "engine.plan").write_bytes(b"plan")
    b = Bundle.open(path)
    assert "engine.plan" in b.unlisted_note()
    staged = tmp_path / "staged.log"
    staged.write_bytes(b"log")
    b.add_files({"build.log": staged}, {})
    assert "engine.plan" in b.unlisted_note()  # still a stray
    plan = tmp_path / "engine2.plan"
    plan.write_bytes(b"plan2")
    (path / "engine.plan").unlink()
    b.add_files({"engine.plan": plan}, {})
    assert b.unlisted_note() is None
