"""Teachers (and their tokenizers) that cannot be used as they are: one clear error each, never a traceback from
transformers and never a silently random-initialised weight (issue 8, items 6 and 8)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_tiny, tiny_tokenizer
from safetensors.torch import load_file, save_file

from sparsekd_deploy.errors import DataError, ModelLoadError, TeacherNotFoundError
from sparsekd_deploy.models.loading import load_model, load_tokenizer, resolve_teacher

DROPPED = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A tiny llama teacher saved without its tokenizer (save_pretrained of the model alone)."""
    d = tmp_path_factory.mktemp("bare") / "llama"
    build_tiny("llama").save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    tiny_tokenizer().save_pretrained(d)
    return d


def _copy(src, tmp_path, name="teacher"):
    return shutil.copytree(src, tmp_path / name)


def _edit_weights(d, edit):
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


# -- tokenizer -------------------------------------------------------------------------------------------------


def test_teacher_without_tokenizer_files_says_pass_tokenizer(bare):
    with pytest.raises(ModelLoadError, match="--tokenizer DIR") as e:
        load_tokenizer(bare)
    assert str(bare) in str(e.value) and "no tokenizer files" in str(e.value)


def test_data_free_runs_need_no_tokenizer(bare):
    assert load_tokenizer(bare, required=False) is None


def test_explicit_tokenizer_dir_is_used(bare, tok_dir):
    tok = load_tokenizer(bare, tok_dir)
    assert tok("hello world")["input_ids"] == tiny_tokenizer()("hello world")["input_ids"]
    assert load_tokenizer(bare, str(tok_dir), required=False) is not None


def test_explicit_tokenizer_dir_must_hold_one(bare, tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer dir '.*nope' does not exist"):
        load_tokenizer(bare, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    # Explicitly asked for: an empty dir is an error even where a tokenizer is optional.
    with pytest.raises(ModelLoadError, match=r"empty has no tokenizer files"):
        load_tokenizer(bare, tmp_path / "empty", required=False)


def test_broken_tokenizer_is_one_error(bare, tmp_path):
    d = _copy(bare, tmp_path)
    (d / "tokenizer_config.json").write_text("{}")  # a config but no vocabulary: AttributeError in transformers
    with pytest.raises(ModelLoadError, match="the tokenizer in teacher dir .* cannot be loaded"):
        load_tokenizer(d, required=False)


def test_data_tokenized_past_the_teacher_vocab_is_refused(tmp_path):
    from sparsekd_deploy.core.teacher import tokenize_file

    data = tmp_path / "d.txt"
    data.write_text("hello world " * 50)
    tok = tiny_tokenizer()
    top = max(tok(data.read_text(), add_special_tokens=False)["input_ids"])
    with pytest.raises(DataError, match=f"token id {top}, but the teacher has only {top} tokens"):
        tokenize_file(data, tok, 8, vocab_size=top)


# -- weights ---------------------------------------------------------------------------------------------------


def test_missing_and_unexpected_tensors_are_refused_by_name(bare, tmp_path):
    d = _copy(bare, tmp_path)

    def edit(sd):
        del sd[DROPPED]
        sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)

    _edit_weights(d, edit)
    with pytest.raises(ModelLoadError) as e:
        load_model(d, role="teacher")
    msg = str(e.value)
    assert f"teacher dir {d}" in msg and "randomly initialised" in msg
    assert DROPPED in msg and "model.layers.0.mlp.extra.weight" in msg


def test_tied_lm_head_is_not_missing_but_a_missing_embedding_is(tmp_path):
    d = tmp_path / "gpt2"
    build_tiny("gpt2").save_pretrained(d, safe_serialization=True)  # tied: no lm_head.weight in the file
    model = load_model(d)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    _edit_weights(d, lambda sd: sd.pop("transformer.wte.weight"))
    with pytest.raises(ModelLoadError, match="transformer.wte.weight"):
        load_model(d)


def test_weights_of_another_shape_than_the_config(bare, tmp_path):
    d = _copy(bare, tmp_path)
    _edit_weights(d, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(64)))
    with pytest.raises(ModelLoadError, match=r"do not fit its config.json \(size mismatch for weight"):
        load_model(d)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, "truncated"])
def test_corrupt_safetensors_named(bare, tmp_path, content):
    d = _copy(bare, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if content == "truncated" else content)
    with pytest.raises(ModelLoadError, match="model.safetensors is not a readable safetensors file.*truncated or corrupt"):
        load_model(d)


def test_sharded_teacher_with_a_shard_missing(bare, tmp_path):
    d = tmp_path / "sharded"
    load_model(bare).save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(ModelLoadError, match=f"missing 1 of its {len(shards)} weight shard.*{shards[1].name}"):
        load_model(d)


# -- config ----------------------------------------------------------------------------------------------------


def test_invalid_config_json(bare, tmp_path):
    d = _copy(bare, tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_model(d)


def test_unknown_and_absent_model_type(bare, tmp_path):
    d = _copy(bare, tmp_path)
    _edit_config(d, lambda c: c.update(model_type="frobnicator"))
    with pytest.raises(ModelLoadError, match="model_type 'frobnicator' is not known to transformers"):
        load_model(d)
    _edit_config(d, lambda c: c.pop("model_type"))
    with pytest.raises(ModelLoadError, match="config.json has no model_type"):
        load_model(d)


@pytest.mark.parametrize("family", ["bert", "distilbert", "t5"])
def test_non_causal_models_are_refused(tmp_path, family):
    import transformers as tf

    cfg = {"bert": tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 vocab_size=256),
           "distilbert": tf.DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=256),
           "t5": tf.T5Config(d_model=32, num_layers=1, num_heads=4, d_ff=64, d_kv=8, vocab_size=256)}[family]
    torch.manual_seed(0)
    tf.AutoModel.from_config(cfg).save_pretrained(tmp_path / family)
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / family)
    assert str(e.value).endswith(
        f"is not a causal language model (model_type {family}); "
        "pass a decoder-only model such as llama, qwen2, gpt2, opt"
    )


# -- dir layout ------------------------------------------------------------------------------------------------


def test_adapter_dir_is_refused(bare, tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    shutil.copy(bare / "config.json", d / "config.json")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    (d / "adapter_model.safetensors").write_bytes(b"x")
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(TeacherNotFoundError, match="is a PEFT/LoRA adapter .*merge it into its base model"):
        resolve_teacher(str(d))
    with pytest.raises(ModelLoadError, match="is a PEFT/LoRA adapter"):
        load_model(d)


def test_safetensors_under_another_name(bare, tmp_path):
    d = _copy(bare, tmp_path)
    (d / "model.safetensors").rename(d / "consolidated.safetensors")
    with pytest.raises(TeacherNotFoundError, match="has consolidated.safetensors but no model.safetensors"):
        resolve_teacher(str(d))


def test_cli_missing_tensor_is_one_line(tiny_dirs, tmp_path):
    from click.testing import CliRunner
    from conftest import FAST

    from sparsekd_deploy.cli import main

    d = _copy(tiny_dirs["llama"], tmp_path)  # with its tokenizer: only the dropped tensor is wrong
    _edit_weights(d, lambda sd: sd.pop(DROPPED))
    r = CliRunner().invoke(main, ["distill", "--teacher", str(d), "--out", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 2, r.output
    assert DROPPED in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
