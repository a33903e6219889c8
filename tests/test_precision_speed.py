"""Decode speed per precision (issue 13, part 6): validation measures the graph's greedy decode speed on the runtime
that validates it and records it with the graph's own record; `inspect` and scripts/results_table.py show it where
it was measured and say "not measured" (never a number) where it was not."""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import cli_build

from sparsekd_deploy.bundle import Bundle
from sparsekd_deploy.cli import main
from sparsekd_deploy.validate import speed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import results_table  # noqa: E402


class _Clock:
    """perf_counter stand-in: each call advances 0.25 s, so a timed run (from its start call to its end call) takes
    0.25 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.25
        return self.now


class _Target:
    def __init__(self):
        self.calls = []

    def generate(self, prompt, tokens):
        self.calls.append((prompt.shape, tokens))


def test_decode_speed_times_batch_one_runs_after_a_warm_up(monkeypatch):
    monkeypatch.setattr(speed.time, "perf_counter", _Clock())
    t = _Target()
    got = speed.decode_speed(t, np.zeros((1, 8), dtype=np.int64), 16, runs=3)
    assert got == {"tokens_per_s": 64.0, "runs_tokens_per_s": [64.0, 64.0, 64.0], "new_tokens": 16,
                   "prompt_tokens": 8, "batch": 1}
    assert t.calls == [((1, 8), 1), ((1, 8), 16), ((1, 8), 16), ((1, 8), 16)]


@pytest.fixture(scope="module")
def q_bundle(tiny_dirs, tmp_path_factory):
    """fp32 + static int8 (int8-dynamic would fail the deterministic gate, README: its ranges are per call)."""
    root = tmp_path_factory.mktemp("q")
    cli_build(tiny_dirs["llama"], root / "b", "--quantize", "int8", "--calibration-samples", "8")
    return root / "b"


def test_validation_records_decode_speed_per_graph(q_bundle):
    refs = json.loads((q_bundle / "references/references.json").read_text())
    for rel in ("model.onnx", "model.int8.onnx"):
        rec = json.loads((q_bundle / f"validation/by-model/{rel}.json").read_text())
        d = rec["metrics"]["decode"]
        assert d["batch"] == 1 and d["tokens_per_s"] > 0 and len(d["runs_tokens_per_s"]) == speed.RUNS
        assert d["new_tokens"] == refs["greedy_tokens"] and d["prompt_tokens"] == refs["prefix"]


def _edit_record(b: Path, rel: str, drop_decode: bool):
    path = b / f"validation/by-model/{rel}.json"
    if drop_decode:  # a record made before decode speed was measured
        rec = json.loads(path.read_text())
        del rec["metrics"]["decode"]
        path.write_text(json.dumps(rec))
    else:
        path.unlink()


def _inspect_text(b: Path) -> str:
    """`inspect`'s table as one line: cell borders dropped, so a phrase wrapped inside a cell reads whole."""
    r = CliRunner().invoke(main, ["inspect", str(b)])
    assert r.exit_code == 0, r.output
    return " ".join(re.sub(r"[│┃|]", " ", r.output).split())


def test_inspect_shows_decode_speed_where_measured(q_bundle, tmp_path):
    b = shutil.copytree(q_bundle, tmp_path / "b")
    text = _inspect_text(b)
    assert text.count("tok/s (batch 1,") == 2 and "onnxruntime cpu)" in text and "not measured" not in text
    _edit_record(b, "model.int8.onnx", drop_decode=True)
    text = _inspect_text(b)
    assert text.count("tok/s (batch 1,") == 1 and "decode speed not measured" in text


def test_results_table_rows_per_precision(q_bundle, tmp_path):
    b = shutil.copytree(q_bundle, tmp_path / "b")
    rows = {r[0]: r for r in results_table.precision_rows(Bundle.open(b))}
    assert set(rows) == {"fp32", "int8"}
    rec = json.loads((b / "validation/by-model/model.int8.onnx.json").read_text())
    assert rows["int8"][3] == f"{rec['metrics']['top1_agreement']:.3f}"
    assert rows["int8"][6] == f"{rec['metrics']['decode']['tokens_per_s']:.1f} tok/s (onnxruntime cpu, batch 1)"
    assert "× fp32" in rows["int8"][1]
    _edit_record(b, "model.int8.onnx", drop_decode=True)
    assert results_table.precision_rows(Bundle.open(b))[1][6] == "not measured"
    _edit_record(b, "model.int8.onnx", drop_decode=False)
    assert results_table.precision_rows(Bundle.open(b))[1][2:] == ("not validated",) * 4 + ("not measured",)


def test_inspect_shows_what_the_onnxruntime_graphs_hold(q_bundle, tmp_path):
    text = _inspect_text(q_bundle)
    for name in ("model.onnx", "model.int8.onnx"):
        assert (f"{name}: attention in 2 layers, RotaryEmbedding 4, SkipSimplifiedLayerNormalization 4, prompts of "
                f"256+ tokens in query blocks of 128") in text
    b = shutil.copytree(q_bundle, tmp_path / "b")  # a hand-edited record: read what is readable, never a traceback
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["model"]["attention_fusion"].update(ort_fusions=["not", "a", "dict"], query_blocks=None)
    (b / "manifest.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(main, ["inspect", str(b), "--no-verify"])
    assert r.exit_code == 0, r.output
    assert "model.onnx: attention in 2 layers;" in " ".join(re.sub(r"[│┃|]", " ", r.output).split())
