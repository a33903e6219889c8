"""Teacher access and the distillation data.

Data: a text file / dir of ``*.txt`` files tokenised into fixed-length sequences, or (the data-free default)
sequences sampled from the teacher itself. Access: ``logits`` (teacher distributions as targets; the teacher
sits in memory) or ``text`` (the teacher's samples are the targets: works with a black-box teacher).
Only ``--data`` needs the tokenizer; data-free runs pass None and work on token ids alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from .sampling import sample


def read_text(path: Path) -> str:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"data dir {path} holds no *.txt files")
    try:
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as e:
        raise DataError(f"data {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def tokenize_file(path: Path, tokenizer, seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """``path``'s text as [N, seq_len] token ids; ``vocab_size``: the teacher's, which every id must fit."""
    if tokenizer is None:
        raise DataError("--data needs a tokenizer, and the teacher dir has none; pass --tokenizer DIR "
                        "(or `tokenizer:` in the recipe) with the teacher's tokenizer")
    text = read_text(path)
    if not text.strip():
        raise DataError(f"data {path} is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise DataError(f"the tokenizer turns data {path} into token id {max(ids)}, but the teacher has only "
                        f"{vocab_size} tokens; pass the teacher's own tokenizer (--tokenizer DIR)")
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def start_token(model, tokenizer) -> int:
    for tid in (getattr(model.config, "bos_token_id", None), getattr(model.config, "eos_token_id", None),
                getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None):
        if isinstance(tid, int):
            return tid
    return 0


def sample_teacher_data(teacher, tokenizer, n: int, seq_len: int, seed: int, batch: int = 64) -> torch.Tensor:
    """Data-free: ``n`` sequences sampled from the teacher at T=1, each starting from its BOS token (else EOS, else 0)."""
    bos = start_token(teacher, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        prompt = torch.full((b, 1), bos, dtype=torch.long)
        toks, _ = sample(teacher, prompt, seq_len - 1, 1.0, gen)
        rows.append(torch.cat([prompt, toks], 1))
    return torch.cat(rows)


def build_data(cfg, teacher, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [N, L], held-out [M, L]) token ids. Raises DataError when the data cannot support a run."""
    from ..models.loading import max_positions

    max_pos = max_positions(teacher.config)
    if max_pos and cfg.seq_len > max_pos:
        raise DataError(f"seq_len {cfg.seq_len} exceeds the teacher's {max_pos} positions")
    if cfg.data is None:
        seqs = sample_teacher_data(teacher, tokenizer, cfg.num_samples + cfg.heldout_samples, cfg.seq_len, cfg.seed)
        return seqs[: cfg.num_samples], seqs[cfg.num_samples :]
    seqs = tokenize_file(Path(cfg.data), tokenizer, cfg.seq_len, teacher.get_input_embeddings().num_embeddings)
    need = cfg.batch_size + 2
    if len(seqs) < need:
        raise DataError(
            f"data {cfg.data} gives {len(seqs)} sequences of {cfg.seq_len} tokens; need at least {need} "
            f"(one batch of {cfg.batch_size} + held-out); add text or lower --seq-len"
        )
    # Held-out: a random (seeded) choice of heldout_samples sequences, at most a tenth of them and at least 2, so
    # both halves are drawn from the whole file; the rest train.
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(cfg.seed))
    n_held = max(2, min(cfg.heldout_samples, len(seqs) // 10))
    return seqs[perm[n_held:]], seqs[perm[:n_held]]
