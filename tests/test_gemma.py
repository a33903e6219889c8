"""Gemma end to end: its tied head (an all-zero padding row in the shared embedding) and its ONNX graph."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, cli_build, tiny_tokenizer

from sparsekd_deploy.core.patterns import NM
from sparsekd_deploy.core.pruner import Pruner, apply_masks
from sparsekd_deploy.exporters.audit import SparsityLostError, audit_onnx, require_pattern, zeroed_weights
from sparsekd_deploy.models.loading import load_model
from sparsekd_deploy.pipeline.export_step import export_and_audit

PROJECTIONS = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


def tiny_gemma(tied: bool = True, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    # pad_token_id=0: Gemma's embedding zeroes that row at init, and the head shares it (tie_word_embeddings).
    cfg = tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64, vocab_size=VOCAB,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)  # sharper outputs, so greedy tokens mean something; the padding row stays zero
    return model.eval()


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    """A tiny Gemma teacher dir (safetensors + tokenizer) and a 2:4 student of it (magnitude, no training)."""
    root = tmp_path_factory.mktemp("gemma")
    model = tiny_gemma()
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight[0].any()
    model.save_pretrained(root / "teacher", safe_serialization=True)
    tiny_tokenizer().save_pretrained(root / "teacher")
    pruner = Pruner(model, NM(2, 4))
    apply_masks(model, pruner.stage_masks({ly.name: ly.weight_oi().detach().abs() for ly in pruner.layers}, 1.0))
    model.save_pretrained(root / "student", safe_serialization=True)
    return root / "teacher", root / "student"


def test_pruner_keeps_a_head_tied_to_the_embedding_dense():
    """Even when --exclude lets lm_head in, a tied head is skipped (pruning it would zero embedding rows); an untied
    head is pruned as any Linear."""
    tied = tiny_gemma()
    pruner = Pruner(tied, NM(2, 4), exclude=("*embed*",))
    assert "lm_head" not in [ly.name for ly in pruner.layers] and len(pruner.layers) == PROJECTIONS
    assert pruner.skipped == {"lm_head": "tied to the embedding model.embed_tokens: kept dense"}
    untied = Pruner(tiny_gemma(tied=False), NM(2, 4), exclude=("*embed*",))
    assert "lm_head" in [ly.name for ly in untied.layers] and not untied.skipped


@pytest.mark.parametrize("target", [None, "onnxruntime"])
def test_padding_row_of_a_tied_head_is_no_pruned_pattern(gemma_dirs, tmp_path, target):
    """The student's zero padding row sits in the embedding its head shares: the audit checks the 14 pruned
    projections (all 2:4 in the graph) and not the head, with or without the onnxruntime target's fusions."""
    _, student = gemma_dirs
    res = export_and_audit(student, tmp_path / "model.onnx", NM(2, 4), fp16=False, target=target)
    audit = res.audits["model.onnx"]
    names = [r["param"] for r in audit["initializers"]]
    assert audit["checked"] == audit["holding"] == PROJECTIONS and "lm_head" not in names
    assert res.pattern_share == pytest.approx(1.0)


def test_a_pruned_weight_whose_graph_consumer_is_not_a_matmul_still_fails(gemma_dirs, tmp_path):
    """The audit's rule is unchanged: handed the head's weight as pruned, it finds it as the embedding's
    initializer, read by a Gather, and refuses it in one line."""
    _, student = gemma_dirs
    model = load_model(student)
    assert "lm_head" not in zeroed_weights(model)
    export_and_audit(student, tmp_path / "model.onnx", None, fp16=False, target=None)
    head = model.lm_head.weight.detach().numpy().copy()
    (r,) = audit_onnx(tmp_path / "model.onnx", {"lm_head": head})
    assert not r.holds and r.initializer == "model.embed_tokens.weight" and r.consumer.startswith("Gather ")
    with pytest.raises(SparsityLostError, match=r"lm_head → model.embed_tokens.weight \(consumer is not a MatMul/Gemm\)"):
        require_pattern([r], "model.onnx")


def test_build_onnxruntime_gemma_end_to_end(gemma_dirs, tmp_path):
    """`build --target onnxruntime` of the tiny Gemma (FAST run, LOOSE gates): distilled to 2:4, exported with its
    attention, rotary (positions expanded to the batch) and residual norms fused, audited on the 14 projections (not the tied head), validated."""
    teacher, _ = gemma_dirs
    cli_build(teacher, tmp_path / "b", "--target", "onnxruntime", "--run-dir", str(tmp_path / "run"))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "gemma" and manifest["pattern_share"] == pytest.approx(1.0)
    fusion = manifest["model"]["attention_fusion"]
    assert fusion["model.onnx"] == 2 and "ort_fusions_skipped" not in fusion
    assert fusion["ort_fusions"]["model.onnx"] == {"RotaryEmbedding": 4, "SkipSimplifiedLayerNormalization": 4,
                                                   "position_rows_expanded": 1}
    audit = json.loads((tmp_path / "b" / "audit.json").read_text())["model.onnx"]
    assert audit["checked"] == audit["holding"] == PROJECTIONS
    assert "lm_head" not in [r["param"] for r in audit["initializers"]]
