"""scripts/make_demo_teacher.py's shape table and scripts/teachers.py's cached second teacher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_demo_teacher as mdt  # noqa: E402
import teachers  # noqa: E402


class _Tok:
    bos_token_id = eos_token_id = pad_token_id = 0


def test_demo_shape_builds_the_committed_demo_config():
    committed = json.loads((ROOT / "sparsekd_deploy/demo/teacher/config.json").read_text())
    built = mdt.build_model("demo", _Tok()).config.to_dict()
    keys = set(committed) - {"architectures", "dtype", "transformers_version"}
    assert {k: built[k] for k in keys} == {k: committed[k] for k in keys}
    assert mdt.SHAPES["demo"]["out"] == Path("sparsekd_deploy/demo/teacher")


def test_wide_shape_is_another_shape_and_vocabulary():
    model = mdt.build_model("wide", _Tok())
    assert model.config.model_type == "gpt2" and model.config.vocab_size == 2048
    assert (model.config.n_embd, model.config.n_layer, model.config.n_head, model.config.n_inner) == (384, 2, 6, 1536)
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.0


def test_second_teacher_reuses_a_complete_dir_and_refuses_a_partial_one(tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "train_teacher", lambda *a, **k: pytest.fail("must not train"))
    wide = tmp_path / "wide"
    wide.mkdir()
    for f in teachers.REQUIRED:
        (wide / f).write_text("{}")
    with pytest.raises(RuntimeError, match="not a complete 'wide' teacher"):
        teachers.second_teacher(tmp_path)
    (wide / "training.json").write_text(json.dumps({"shape": "wide"}))
    assert teachers.second_teacher(tmp_path) == wide


@pytest.mark.slow
def test_train_teacher_writes_a_loadable_hf_dir(tmp_path):
    from sparsekd_deploy.models.loading import load_model, load_tokenizer

    out = teachers.train_teacher("wide", tmp_path / "teachers" / "wide", minutes=0.01, corpus_mb=3)
    assert teachers.is_complete(out, "wide")
    assert not list(out.parent.glob(".wide.tmp-*"))
    record = json.loads((out / "training.json").read_text())
    assert record["uniform_perplexity"] == 2048.0 and record["heldout_tokens"] > 0
    model, tok = load_model(out), load_tokenizer(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and len(tok) == model.config.vocab_size == 2048
