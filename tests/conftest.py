"""Tiny models built from transformers configs with a fixed seed (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 256
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, **common)
    raise KeyError(family)


FAMILIES = ["llama", "qwen2", "gpt2", "opt"]


def build_tiny(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    # Random init gives near-uniform outputs; sharpen so KL/top-1 measurements mean something.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family saved as a normal HF model dir (safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    out = {}
    for fam in FAMILIES:
        d = root / fam
        build_tiny(fam).save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        out[fam] = d
    return out


@pytest.fixture
def fast_cfg(tmp_path):
    """Config overrides for a run that takes seconds on 2 cores."""
    return dict(out=str(tmp_path / "run"), stages=2, steps_per_stage=4, step_schedule="equal", retries=0, kl_budget=50.0, seq_len=16,
                num_samples=16, heldout_samples=4, batch_size=4, calib_batches=1, consistency_prompts=2,
                consistency_samples=3, consistency_tokens=4, consistency_m=2)


@pytest.fixture(scope="session")
def pruned_dirs(tiny_dirs, tmp_path_factory):
    """Tiny students pruned to 2:4 (magnitude, no training) with their sparsity.json, as a run would leave them."""
    import json

    from sparsekd_deploy.core.patterns import NM
    from sparsekd_deploy.core.pruner import Pruner, apply_masks, sparsity_report
    from sparsekd_deploy.models.loading import load_model

    root = tmp_path_factory.mktemp("pruned")
    out = {}
    for fam in ("llama", "gpt2"):
        model = load_model(tiny_dirs[fam])
        pruner = Pruner(model, NM(2, 4))
        masks = pruner.stage_masks({ly.name: ly.weight_oi().detach().abs() for ly in pruner.layers}, 1.0)
        apply_masks(model, masks)
        d = root / fam / "student"
        model.save_pretrained(d)
        (root / fam / "sparsity.json").write_text(json.dumps(sparsity_report(pruner, model)))
        out[fam] = d
    return out


@pytest.fixture(scope="session")
def exported(pruned_dirs, tmp_path_factory):
    """(model, onnx path) per family, exported once with KV cache."""
    from sparsekd_deploy.exporters.onnx import export_onnx
    from sparsekd_deploy.models.loading import load_model

    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for fam, d in pruned_dirs.items():
        path = root / f"{fam}.onnx"
        export_onnx(d, path)
        out[fam] = (load_model(d), path)
    return out


# `build` flags for a run that takes seconds (FAST) and gates that any tiny student passes (LOOSE).
FAST = ["--stages", "2", "--steps-per-stage", "4", "--retries", "0", "--kl-budget", "50", "--seq-len", "32",
        "--num-samples", "16", "--batch-size", "4"]
LOOSE = ["--max-kl", "5", "--min-top1", "0", "--min-greedy-match", "0", "--max-ppl-ratio", "100",
         "--min-consistency-ratio", "0"]


def cli_build(teacher, out, *args):
    """`sparsekd-deploy build --teacher T --out O ARGS --json FAST LOOSE` through click; fails the test unless it
    succeeded, and returns the click result."""
    from click.testing import CliRunner

    from sparsekd_deploy.cli import main

    r = CliRunner().invoke(main, ["build", "--teacher", str(teacher), "--out", str(out), *args, "--json", *FAST, *LOOSE],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def skip_where_tensorrt_runs():
    """The engine-step fixtures describe a machine without TensorRT/GPU; where both are here, engines are built for
    real (the tensorrt-marked tests)."""
    from sparsekd_deploy.exporters.trt_compat import this_machine

    if this_machine()["tensorrt_version"] and this_machine()["compute_capability"]:
        pytest.skip("TensorRT and a GPU are here: the engine is built for real (tensorrt-marked tests)")


@pytest.fixture(scope="session")
def device_step_bundle(tiny_dirs, tmp_path_factory):
    """`build --target tensorrt` on a machine without TensorRT/GPU: (bundle dir, CLI output, JSON summary)."""
    import json

    skip_where_tensorrt_runs()
    root = tmp_path_factory.mktemp("trt")
    r = cli_build(tiny_dirs["llama"], root / "b", "--target", "tensorrt", "--run-dir", str(root / "run"),
                  "--batch", "1,2,4", "--seq", "1,16,32", "--past", "0,16,32")
    return root / "b", r.output, json.loads(r.stdout[r.stdout.index("{"):])


@pytest.fixture(scope="session")
def ort_bundle(tiny_dirs, tmp_path_factory):
    """A small ONNX Runtime bundle of the tiny Llama (FAST run, LOOSE gates), built once per session. Read-only:
    a test that changes a bundle copies it first."""
    from click.testing import CliRunner

    from sparsekd_deploy.cli import main

    root = tmp_path_factory.mktemp("ort-bundle")
    r = CliRunner().invoke(main, ["build", "--target", "onnxruntime", "--teacher", str(tiny_dirs["llama"]),
                                  "--out", str(root / "b"), "--run-dir", str(root / "run"), *FAST, *LOOSE],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return root / "b"


def masks_bind_after_each_training_segment(monkeypatch) -> list[bool]:
    """Spy on ``StagedDistiller.train_steps``: after each segment of steps, whether every masked weight is exactly
    zero (appended to the returned list as the run goes)."""
    from sparsekd_deploy.core import distill as distill_mod

    seen: list[bool] = []
    orig = distill_mod.StagedDistiller.train_steps

    def spy(self, *args, **kw):
        orig(self, *args, **kw)
        params = dict(self.raw.named_parameters())
        seen.append(all((params[k][~m] == 0).all() for k, m in self.masks.items()))

    monkeypatch.setattr(distill_mod.StagedDistiller, "train_steps", spy)
    return seen


class OneLinear(torch.nn.Module):
    """One bias-free 4 → 2 Linear (``fc``): small enough to write every weight of a test by hand."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2, bias=False)
