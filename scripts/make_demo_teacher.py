"""Train the built-in demo teacher, offline, on the Python standard library's own sources.

The product needs a *trained* teacher that exists on every machine without a download. Every Python
installation ships its standard library, so its sources (code + docstrings) are the corpus. The result
(a ~3.7M-parameter Llama, fp32 safetensors, ~15 MB) is checked into ``sparsekd_deploy/demo/teacher``.

    .venv/bin/python scripts/make_demo_teacher.py --minutes 8 --out sparsekd_deploy/demo/teacher

``--shape`` picks the model from ``SHAPES``: ``demo`` (the default, the committed teacher above: a narrow-and-deeper
Llama, vocab 4096) or ``wide`` (a second teacher of another shape for benchmarks, trained the same way on the same
corpus and held-out split: a wide-and-shallow GPT-2 with Conv1D layers, learned positions and its own BPE of
vocab 2048; not committed, ``scripts/teachers.py`` builds it under ``runs/teachers/wide`` on first use):

    .venv/bin/python scripts/make_demo_teacher.py --shape wide --minutes 6 --out runs/teachers/wide

It prints and stores (``training.json``) the held-out perplexity next to the uniform baseline (= vocab size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 4096  # the demo shape's vocabulary (each shape in SHAPES has its own)
SEQ = 128

# One row per teacher shape. Everything else (corpus, held-out split, tokenizer recipe, optimizer, schedule, batch,
# seed) is shared, so two shapes differ only in what this table says.
SHAPES: dict[str, dict] = {
    "demo": {  # narrow-and-deeper Llama (RMSNorm, rotary positions, SwiGLU, nn.Linear); the committed demo teacher
        "arch": "llama", "vocab": VOCAB, "hidden": 256, "layers": 4, "heads": 4, "intermediate": 512,
        "out": Path("sparsekd_deploy/demo/teacher"),
    },
    "wide": {  # wide-and-shallow GPT-2 (LayerNorm, learned positions, GELU, Conv1D), another vocabulary size
        "arch": "gpt2", "vocab": 2048, "hidden": 384, "layers": 2, "heads": 6, "intermediate": 4 * 384,
        "out": Path("runs/teachers/wide"),
    },
}


def corpus_files(max_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idle_test", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip")
    files = []
    total = 0
    for f in sorted(root.rglob("*.py")):
        if any(part in skip for part in f.relative_to(root).parts):
            continue
        size = f.stat().st_size
        if total + size > max_bytes:
            break
        files.append(f)
        total += size
    return files


def is_heldout(path: Path) -> bool:
    # Split by file (not by chunk) so held-out text is genuinely unseen code.
    return hashlib.sha256(path.name.encode()).digest()[0] < 13  # ~5%


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def encode(tok: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.append(tok.bos_token_id)
        ids.extend(tok(t)["input_ids"])
    n = len(ids) // SEQ
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)


def build_model(shape: str, tok: PreTrainedTokenizerFast) -> torch.nn.Module:
    """The untrained model of ``SHAPES[shape]`` (draws its initial weights from torch's global generator)."""
    s = SHAPES[shape]
    if s["arch"] == "llama":
        config = LlamaConfig(
            vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
            max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        return LlamaForCausalLM(config)
    if s["arch"] == "gpt2":
        # No dropout: the Llama has none either, and a teacher is only ever run in eval mode.
        config = GPT2Config(
            vocab_size=s["vocab"], n_embd=s["hidden"], n_inner=s["intermediate"], n_layer=s["layers"],
            n_head=s["heads"], n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"shape {shape!r}: unknown arch {s['arch']!r}")


@torch.no_grad()
def heldout_ppl(model: torch.nn.Module, data: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in data.split(32)]
    model.train()
    return math.exp(sum(losses) / len(losses))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo",
                    help="model shape from SHAPES (default: demo, the committed demo teacher)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output dir (default: sparsekd_deploy/demo/teacher for demo, runs/teachers/<shape> otherwise)")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--corpus-mb", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own); on a busy shared machine 1 can be faster")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    if args.out is None:
        args.out = shape["out"]
    torch.manual_seed(args.seed)

    files = corpus_files(int(args.corpus_mb * 1e6))
    train_txt = [f.read_text(errors="replace") for f in files if not is_heldout(f)]
    held_txt = [f.read_text(errors="replace") for f in files if is_heldout(f)]
    print(f"corpus: {len(files)} files ({len(train_txt)} train, {len(held_txt)} held out)")
    tok = train_tokenizer(train_txt, shape["vocab"])
    train, held = encode(tok, train_txt), encode(tok, held_txt)[:256]
    print(f"tokens: train {train.numel():,}, held-out {held.numel():,}")
    if held.numel() == 0:
        ap.error(f"--corpus-mb {args.corpus_mb:g} leaves no held-out text (split by file, ~5%); give more")

    model = build_model(args.shape, tok)
    uniform_ppl = float(shape["vocab"])
    print(f"params: {sum(p.numel() for p in model.parameters()):,}; untrained held-out ppl {heldout_ppl(model, held):.0f}")

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    deadline = time.time() + args.minutes * 60
    g = torch.Generator().manual_seed(args.seed)
    step = 0
    est_steps = 4000
    while time.time() < deadline:
        lr = 3e-3 * min(1.0, (step + 1) / 100) * max(0.05, 0.5 * (1 + math.cos(math.pi * min(1.0, step / est_steps))))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = train[torch.randint(len(train), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e}", flush=True)
    ppl = heldout_ppl(model, held)
    print(f"trained {step} steps: held-out ppl {ppl:.2f} vs uniform {uniform_ppl:.0f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    record = {
        "corpus": f"Python {sys.version.split()[0]} standard library sources", "files": len(files),
        "train_tokens": train.numel(), "heldout_tokens": held.numel(), "steps": step, "seq_len": SEQ,
        "heldout_perplexity": round(ppl, 3), "uniform_perplexity": uniform_ppl, "seed": args.seed,
    }
    if args.shape != "demo":  # the demo teacher's training.json keeps its committed keys
        record.update({
            "shape": args.shape, "arch": shape["arch"], "vocab_size": shape["vocab"], "hidden_size": shape["hidden"],
            "num_layers": shape["layers"], "num_heads": shape["heads"], "intermediate_size": shape["intermediate"],
            "params": sum(p.numel() for p in model.parameters()), "minutes": args.minutes,
        })
    # training.json is written last: a dir that has it holds a complete teacher.
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
