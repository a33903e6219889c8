"""The onnxruntime target's fusions (``exporters/ort_attention.py``: our attention, then ORT's rotary and skip-norm
fusers) on tiny models of each family / rotary variant, built here from configs (seeded, weights x4 so that greedy
tokens mean something): per case, what was fused (or why ORT's fusers' graph was not kept), max |Δlogit| of the
plain and the fused graph against PyTorch on 2 x 24-token prompts, a 12-token KV-cache greedy decode of the fused
graph against the plain one, and what a prompt + decode past ``max_position_embeddings`` gets from each.

    .venv/bin/python scripts/check_ort_fusions.py                       # every case, fp32
    .venv/bin/python scripts/check_ort_fusions.py --cases llama,gemma --modes int8-dynamic,int8,int4-weight
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers as tf

from sparsekd_deploy.exporters.onnx import export_onnx
from sparsekd_deploy.exporters.ort_attention import fuse_attention
from sparsekd_deploy.models.loading import load_model, max_positions
from sparsekd_deploy.pipeline.export_step import QuantizeRequest, _quantize
from sparsekd_deploy.targets.base import TargetError
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)
CASES = {
    "llama": lambda: tf.LlamaConfig(**SIZE, **COMMON),
    "llama-tied": lambda: tf.LlamaConfig(**SIZE, tie_word_embeddings=True, **COMMON),
    "llama-mha": lambda: tf.LlamaConfig(**{**SIZE, "num_key_value_heads": 4}, **COMMON),
    "llama-head16": lambda: tf.LlamaConfig(**SIZE, head_dim=16, **COMMON),
    "llama-linear": lambda: tf.LlamaConfig(**SIZE, rope_scaling={"rope_type": "linear", "factor": 2.0}, **COMMON),
    "llama-dynamic": lambda: tf.LlamaConfig(**SIZE, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **COMMON),
    "llama-llama3": lambda: tf.LlamaConfig(**SIZE, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, **COMMON),
    "llama-yarn": lambda: tf.LlamaConfig(**SIZE, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, **COMMON),
    "mistral": lambda: tf.MistralConfig(**SIZE, **COMMON),
    "qwen2": lambda: tf.Qwen2Config(**SIZE, **COMMON),
    "qwen3": lambda: tf.Qwen3Config(**SIZE, head_dim=8, **COMMON),
    "gemma": lambda: tf.GemmaConfig(**SIZE, head_dim=8, pad_token_id=None, **COMMON),
    "phi3": lambda: tf.Phi3Config(**SIZE, pad_token_id=0, **COMMON),
    "phi3-partial": lambda: tf.Phi3Config(**SIZE, partial_rotary_factor=0.5, pad_token_id=0, **COMMON),
    "gpt-neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25, **COMMON),
    "stablelm": lambda: tf.StableLmConfig(**SIZE, partial_rotary_factor=0.25, **COMMON),
    "granite": lambda: tf.GraniteConfig(**SIZE, **COMMON),
}


def model_dir(case: str, root: Path) -> Path:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CASES[case]())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.eval().save_pretrained(root / case, safe_serialization=True)
    return root / case


def past_limit(target: OnnxRuntimeTarget, limit: int) -> str:
    prompt = np.arange(3, limit - 1, dtype=np.int64)[None] % VOCAB  # limit - 4 tokens + 8 new: 4 positions past it
    try:
        return f"ran ({target.generate(prompt, 8).tokens.shape[1]} tokens)"
    except TargetError as e:
        return f"refused: {e}"


def check(case: str, root: Path, modes: list[str], with_past: bool) -> None:
    d = model_dir(case, root)
    model, plain = load_model(d), root / f"{case}.onnx"
    export_onnx(d, plain, with_past=with_past)
    graphs = {"fp32": plain}
    for mode in modes:
        ids = torch.randint(3, VOCAB, (32, 16), generator=torch.Generator().manual_seed(1)).numpy()
        graphs[mode], _ = _quantize(plain, QuantizeRequest(mode, calibration_ids=ids, samples=32))
    prompts = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=prompts).logits.numpy()
    limit = max_positions(model.config)
    for mode, graph in graphs.items():
        fused = graph.with_name(graph.stem + ".fused.onnx")
        info = fuse_attention(graph, fused, max_positions=limit)
        a, b = OnnxRuntimeTarget(graph), OnnxRuntimeTarget(fused)
        diffs = [float(np.abs(t.logits(prompts.numpy()) - ref).max()) for t in (a, b)]
        ids = prompts.numpy()[:, :6]
        same = bool((a.generate(ids, 12).tokens == b.generate(ids, 12).tokens).all())
        what = info.ort_fusions if info.ort_skipped is None else f"ORT's fusers not kept: {info.ort_skipped[:90]}"
        print(f"{case:14s} {mode:12s} attention {info.fused}, {what}; max |Δlogit| vs PyTorch plain {diffs[0]:.2g}, "
              f"fused {diffs[1]:.2g}; greedy fused == plain: {same}; past {limit} positions: plain "
              f"{past_limit(a, limit)}, fused {past_limit(b, limit)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--modes", default="", help="quantized copies to check too (int8-dynamic, int8, int4-weight)")
    ap.add_argument("--no-kv-cache", action="store_true", help="export logits only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            check(case, Path(tmp), [m for m in args.modes.split(",") if m], not args.no_kv_cache)


if __name__ == "__main__":
    main()
