"""Architectures beyond the four of ``conftest.FAMILIES``, built tiny from their transformers configs with a fixed
seed, through the CLI: each works or is refused in one line, and ``--json`` stdout stays one JSON document."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import VOCAB, tiny_tokenizer

from sparsekd_deploy.cli import main


def _save(config, path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cohere_dir(tmp_path_factory):
    from transformers import CohereConfig

    return _save(CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0),
                 tmp_path_factory.mktemp("cohere") / "cohere")


def test_cohere_export_for_onnxruntime_keeps_json_stdout_one_document(cohere_dir, tmp_path):
    # ORT's fusers cannot type Cohere's graph: its onnx_model.py print()s "failed in shape inference" (on stdout,
    # before the JSON) and its top-level module loggers warn on stderr; the attention fusion itself still applies.
    r = CliRunner().invoke(main, ["export", str(cohere_dir), "--out", str(tmp_path / "m.onnx"), "--target",
                                  "onnxruntime", "--quantize", "int8-dynamic", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["export"]["attention_fusion"]["m.onnx"] == 2  # both layers' attention fused
    assert doc["parity"]["fp32"]["max_abs_logit_diff"] < 1e-3
    assert "failed in shape inference" not in r.output
    assert "WARNING:fusion" not in r.stderr
