"""scripts/bench_matrix.py: one cell end to end on a tiny model (2 optimizer steps), its cache and its report."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_matrix as bm  # noqa: E402

SIZES = {"num_samples": 8, "heldout_samples": 4, "seq_len": 16, "test_samples": 4, "entropy_prompts": 2,
         "entropy_samples": 2, "entropy_tokens": 4}
EXTRA = {"batch_size": 4, "calib_batches": 1}


def test_one_cell_cached_and_reported(tiny_dirs, tmp_path, monkeypatch):
    from sparsekd_deploy.models.loading import load_model, load_tokenizer

    teacher_dir = tiny_dirs["llama"]
    teacher = load_model(teacher_dir)
    test = bm.make_test_set(teacher, load_tokenizer(teacher_dir, required=False), 0, SIZES)
    assert test.seed == bm.TEST_SEED_OFFSET and test.ids.shape == (4, 16)
    settings = {"steps": 2, "kl_budget": 1000.0, "lr": None, "batch_size": 4, **SIZES}
    bm.share_distillation_sets()
    cell = bm.Cell("tiny", "2:4", "oneshot-kd", 0)
    rec = bm.run_cell(cell, teacher_dir, teacher, test, tmp_path, settings, EXTRA)
    assert rec["status"] == "ok", rec.get("reason")
    assert math.isfinite(rec["test_kl"]) and rec["test_kl"] > 0 and 0 <= rec["test_top1"] <= 1
    assert rec["distiller"]["steps"] == 2 and rec["distiller"]["reached_target"]
    assert json.loads(cell.path(tmp_path).read_text())["test_kl"] == rec["test_kl"]
    assert not cell.run_dir(tmp_path).exists()  # measured, then deleted
    assert bm.load_cached(cell, tmp_path, settings) is not None  # a rerun skips it
    assert bm.load_cached(cell, tmp_path, {**settings, "steps": 4}) is None  # another budget does not

    # A method the config rejects is recorded as unsupported and not treated as finished.
    monkeypatch.setitem(bm.METHODS, "bogus", {"label": "bogus", "kind": "trained", "staged": True,
                                              "overrides": {"allocation": "no-such-allocation"}})
    bad = bm.Cell("tiny", "2:4", "bogus", 0)
    assert bm.run_cell(bad, teacher_dir, teacher, test, tmp_path, settings, EXTRA)["status"] == "unsupported"
    assert bm.load_cached(bad, tmp_path, settings) is None

    text = bm.report([rec], tmp_path, [0], 2, "note")
    assert "| 2:4 | one-shot Wanda + KD |" in text and "wins" in text
    assert (tmp_path / "results.md").is_file() and (tmp_path / "kl_vs_sparsity_tiny.png").is_file()


def test_paired_ratio_is_the_mean_of_per_seed_ratios_beside_the_ratio_of_means():
    def cell(method, seed, kl):
        return {"model": "m", "pattern": "2:4", "method": method, "seed": seed, "test_kl": kl, "test_top1": 0.5,
                "entropy": {"mean_entropy": 1.0}, "teacher_entropy": {"mean_entropy": 1.0}, "target_sparsity": 0.5,
                "distiller": {"heldout_kl": kl, "sparsity": 0.5, "reached_target": True}, "seconds": 1.0}

    records = [cell(bm.REF, 0, 0.1), cell(bm.REF, 1, 0.2), cell("staged", 0, 0.05), cell("staged", 1, 0.3)]
    row = bm.aggregate(records, [0, 1])["m"]["2:4"]["staged"]
    assert row["paired_ratio"] == pytest.approx(1.0)  # (0.5 + 1.5) / 2
    assert row["ratio_vs_ref"] == pytest.approx(0.35 / 0.3)
    assert bm.aggregate(records, [0, 1])["m"]["2:4"][bm.REF]["paired_ratio"] is None
    assert "| 1.000 |" in bm.markdown(bm.aggregate(records, [0, 1]), [0, 1], 2, "")
