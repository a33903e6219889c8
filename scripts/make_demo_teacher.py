"""Train the built-in demo teacher, offline, on the Python standard library's own sources.

The product needs a *trained* teacher that exists on every machine without a download. Every Python
installation ships its standard library, so its sources (code + docstrings) are the corpus. The result
(a ~3.7M-parameter Llama, fp32 safetensors, ~15 MB) is checked into ``sparsekd_deploy/demo/teacher``.

    .venv/bin/python scripts/make_demo_teacher.py --minutes 8 --out sparsekd_deploy/demo/teacher

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
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 4096
SEQ = 128


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


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
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


@torch.no_grad()
def heldout_ppl(model: LlamaForCausalLM, data: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in data.split(32)]
    model.train()
    return math.exp(sum(losses) / len(losses))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("sparsekd_deploy/demo/teacher"))
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--corpus-mb", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    files = corpus_files(int(args.corpus_mb * 1e6))
    train_txt = [f.read_text(errors="replace") for f in files if not is_heldout(f)]
    held_txt = [f.read_text(errors="replace") for f in files if is_heldout(f)]
    print(f"corpus: {len(files)} files ({len(train_txt)} train, {len(held_txt)} held out)")
    tok = train_tokenizer(train_txt)
    train, held = encode(tok, train_txt), encode(tok, held_txt)[:256]
    print(f"tokens: train {train.numel():,}, held-out {held.numel():,}")

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    uniform_ppl = float(VOCAB)
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
    (args.out / "training.json").write_text(json.dumps({
        "corpus": f"Python {sys.version.split()[0]} standard library sources", "files": len(files),
        "train_tokens": train.numel(), "heldout_tokens": held.numel(), "steps": step, "seq_len": SEQ,
        "heldout_perplexity": round(ppl, 3), "uniform_perplexity": uniform_ppl, "seed": args.seed,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
