"""The onnxruntime target's fusions (``exporters/ort_attention.py``: our attention, then ORT's rotary and skip-norm
fusers) on tiny models of each family / rotary variant, built here from configs (seeded, weights x4 so that greedy
tokens mean something): per case, what was fused (or why ORT's fusers' graph was not kept), max |Δlogit| of the
plain and the fused graph against PyTorch on 2 x 24-token prompts, a 12-token KV-cache greedy decode of the fused
graph against the plain one, and what a prompt + decode past ``max_position_embeddings`` gets from each.

``--query-blocks B,M`` fuses with prompt attention in blocks of B queries from M queries on
(``exporters/ort_query_blocks.py``; the product's 128 / 256 never trigger on these 64-position models) and also holds
that graph to the same graph fused with no query blocks: max |Δ| of the logits at real positions and of the present
K / V, over prompts of 8..40 tokens, batch 2, with and without a cache, left padding in the prompt and in the cache.

    .venv/bin/python scripts/check_ort_fusions.py                       # every case, fp32
    .venv/bin/python scripts/check_ort_fusions.py --cases llama,gemma --modes int8-dynamic,int8,int4-weight
    .venv/bin/python scripts/check_ort_fusions.py --query-blocks 4,8 --modes int8-dynamic,int8,int4-weight
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


# (past, new tokens, left padding of row 0): at / over the minimum of 8, a last block of one query, many blocks,
# a cache before the prompt, padding inside the prompt and inside the cache, below the minimum, a decode step.
BLOCK_CASES = [(0, 8, 0), (0, 13, 0), (0, 40, 0), (0, 27, 5), (5, 11, 0), (6, 9, 4), (12, 20, 2), (3, 7, 0), (9, 1, 2)]


def _block_feed(session, past: int, new: int, pad: int, seed: int) -> tuple[dict, np.ndarray]:
    """Batch 2 (row 0 left-padded by ``pad``), a random cache of ``past`` positions; which query rows are real."""
    rng = np.random.default_rng(seed)
    inputs = {i.name: i for i in session.get_inputs()}
    mask = np.ones((2, past + new), np.int64)
    mask[0, :pad] = 0
    feed = {"input_ids": rng.integers(3, VOCAB, (2, new)), "attention_mask": mask,
            "position_ids": np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, past:]}
    feed = {k: v for k, v in feed.items() if k in inputs}
    for name, meta in inputs.items():
        if name.startswith("past_key_values."):
            dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
            feed[name] = rng.standard_normal((2, meta.shape[1], past, meta.shape[3])).astype(dtype)
    return feed, mask[:, past:].astype(bool)


def block_diffs(unblocked: Path, blocked: Path) -> tuple[float, float, str, int]:
    """Max |Δ| of the logits at real positions and of the present K / V (where no query of the prompt is padding:
    a padded query sees no key, so its own output — read by no real position — is any average), the feed
    (past+new/pad) of the largest logit Δ, and the feeds run."""
    import onnxruntime as ort

    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (unblocked, blocked))
    cached = any(i.name.startswith("past_key_values.") for i in a.get_inputs())
    names = [o.name for o in a.get_outputs()]
    logit, kv, worst, ran = 0.0, 0.0, "", 0
    for past, new, pad in BLOCK_CASES:
        if past and not cached:
            continue
        feed, real = _block_feed(a, past, new, pad, seed=past * 100 + new)
        want = dict(zip(names, a.run(None, feed), strict=True))
        got = dict(zip(names, b.run(None, feed), strict=True))
        diff = float(np.abs(got["logits"][real] - want["logits"][real]).max())
        if not np.isfinite(got["logits"]).all():
            diff = float("nan")
        if not diff <= logit:  # NaN included
            logit, worst = diff, f"{past}+{new}/pad {pad}"
        for name in names:
            if name.startswith("present.") and pad <= past:
                kv = max(kv, float(np.abs(got[name].astype(np.float32) - want[name].astype(np.float32)).max()))
        ran += 1
    return logit, kv, worst, ran


def check(case: str, root: Path, modes: list[str], with_past: bool, query_blocks: tuple[int, int] | None = None,
          table: list | None = None) -> None:
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
        if query_blocks is None:
            info = fuse_attention(graph, fused, max_positions=limit)
        else:
            info = fuse_attention(graph, fused, max_positions=limit, query_blocks=query_blocks)
            unblocked = graph.with_name(graph.stem + ".unblocked.onnx")
            fuse_attention(graph, unblocked, max_positions=limit, query_blocks=None)
            if info.query_blocks is None:  # no attention this rewrite recognised: nothing blocked, nothing to hold
                table.append((case, mode, 0, float("nan"), float("nan"), "not fused", 0))
            else:
                table.append((case, mode, info.query_blocks["layers"], *block_diffs(unblocked, fused)))
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
    ap.add_argument("--query-blocks", default="", metavar="B,M",
                    help="fuse with query blocks of B from M queries on, and compare to the unblocked fused graph")
    args = ap.parse_args()
    blocks = tuple(int(x) for x in args.query_blocks.split(",")) if args.query_blocks else None
    if blocks is not None and len(blocks) != 2:
        ap.error("--query-blocks takes two numbers: B,M")
    table: list = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            check(case, Path(tmp), [m for m in args.modes.split(",") if m], not args.no_kv_cache, blocks, table)
    if blocks is not None:
        print(f"\nquery blocks of {blocks[0]} from {blocks[1]} queries vs the same graph unblocked "
              f"(batch 2, prompts 1..40 tokens, cache 0..12, left padding): max |Δ|")
        print(f"{'case':14s} {'mode':12s} {'layers':>6s} {'logits':>9s} {'at':>12s} {'present K/V':>11s} {'feeds':>5s}")
        for case, mode, layers, logit, kv, worst, ran in table:
            print(f"{case:14s} {mode:12s} {layers:6d} {logit:9.2g} {worst:>12s} {kv:11.2g} {ran:5d}")


if __name__ == "__main__":
    main()
