import json

import pytest

from sparsekd_deploy.bundle import SCHEMA_VERSION, Bundle, BundleError, BundleWriter


def _make(tmp_path, name="b"):
    w = BundleWriter(tmp_path / name)
    (w.dir / "model.onnx").write_bytes(b"\x08\x01" * 100)
    (w.dir / "references").mkdir()
    (w.dir / "references" / "r.json").write_text("{}")
    return w.commit({"name": name, "model": {"onnx": "model.onnx"}})


def test_manifest_has_checksums_and_schema(tmp_path):
    path = _make(tmp_path)
    b = Bundle.open(path)
    assert b.manifest["schema_version"] == SCHEMA_VERSION
    assert set(b.manifest["files"]) == {"model.onnx", "references/r.json"}
    assert b.manifest["files"]["model.onnx"]["bytes"] == 200
    assert not (tmp_path / "b.partial").exists()


def test_corrupted_and_truncated_files_refused(tmp_path):
    path = _make(tmp_path)
    data = (path / "model.onnx").read_bytes()
    (path / "model.onnx").write_bytes(data[:-1] + b"\x00")
    with pytest.raises(BundleError, match="checksum mismatch"):
        Bundle.open(path)
    (path / "model.onnx").write_bytes(data[:50])
    with pytest.raises(BundleError, match="truncated"):
        Bundle.open(path)
    (path / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.open(path)


def test_unknown_schema_and_not_a_bundle(tmp_path):
    path = _make(tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    m["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 99 is not supported"):
        Bundle.open(path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.open(tmp_path / "plain")
    with pytest.raises(BundleError, match="not a directory"):
        Bundle.open(tmp_path / "nothing")


def test_validation_json_is_mutable_and_overwrite_rules(tmp_path):
    path = _make(tmp_path)
    b = Bundle.open(path)
    b.write_validation({"passed": True})
    Bundle.open(path)  # still verifies
    with pytest.raises(BundleError, match="--overwrite"):
        BundleWriter(path)
    w = BundleWriter(path, overwrite=True)
    w.abort()
    assert Bundle.open(path)  # aborting a rewrite leaves the old bundle intact
