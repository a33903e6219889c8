"""The KD loss of one batch as the distiller computes it: teacher from memory (logits access) or from its top-K cache
on disk, full logits or chunks of tokens (``losses.chunked_kd_loss``). One object, chosen once per run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.lm_head import final_hidden, output_head
from .losses import LossFn, bucket_kd_loss, chunked_kd_loss, kd_loss
from .operators import Operator, TopK
from .topk_cache import CacheSplit


@dataclass
class KDObjective:
    operator: Operator
    loss_fn: LossFn
    chunk: int = 0  # tokens per chunk of the loss; 0 = full logits
    cache: CacheSplit | None = None  # the training split of a teacher top-K cache (then no teacher is needed)

    def __call__(self, student, teacher, ids: torch.Tensor, rows: torch.Tensor | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """Scalar KD loss of ``student`` on ``ids`` [B, L]; ``rows``: their row numbers in the cached split (found by
        content when None). Forward passes run under ``autocast``; the loss itself in float32."""
        buckets = None
        if self.cache is not None:
            idx, p_b = self.cache.targets(rows, ids)
            buckets = (idx.to(ids.device), p_b.to(ids.device))
        if self.chunk:
            with autocast():
                hidden = final_hidden(student, ids)
                t_hidden = None
                if buckets is None:
                    with torch.no_grad():
                        t_hidden = final_hidden(teacher, ids)
                # inside autocast: each chunk's lm_head matmul runs in the autocast dtype, as the model's own would
                return chunked_kd_loss(hidden, output_head(student), self.operator, self.loss_fn, self.chunk,
                                       teacher_hidden=t_hidden, teacher_head=None if buckets else output_head(teacher),
                                       buckets=buckets)
        with autocast():
            s_logits = student(input_ids=ids).logits
            if buckets is None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids).logits
        if buckets is not None:
            return bucket_kd_loss(*buckets, s_logits, self.loss_fn)
        return kd_loss(t_logits, s_logits, self.operator, self.loss_fn)


def check_topk_sizes(cfg, operator: Operator, vocab: int) -> None:
    """A ``topk:K`` teacher access or operator keeps K of the vocabulary's outcomes, so K above the vocabulary is a
    mistake (a K meant for another model): refused in one line naming the vocabulary, where it was once capped
    silently (the cache and the stamp then held fewer than the K asked for)."""
    from ..config import topk_access

    problems = []
    k = topk_access(cfg.teacher_access)
    if k is not None and k > vocab:
        problems.append(f"teacher_access topk:{k} keeps more outcomes than the teacher's vocabulary of {vocab} tokens; "
                        f"pass --teacher-access topk:K with K ≤ {vocab} (topk:{vocab} keeps every token), or logits")
    op_k = operator.K if isinstance(operator, TopK) else None
    if op_k is not None and op_k > vocab and op_k != k:  # (the access's K, defaulted into the operator: said once)
        problems.append(f"operator topk:{op_k} keeps more outcomes than the teacher's vocabulary of {vocab} tokens; "
                        f"pass --operator topk:K with K ≤ {vocab}")
    if problems:
        from ..errors import ConfigError

        raise ConfigError(problems)


def prepare(cfg, student, teacher, teacher_dir, operator: Operator, loss_fn: LossFn, train_ids: torch.Tensor,
            heldout_ids: torch.Tensor, device, default_cache_dir, reporter, team=None,
            on_student=None) -> tuple[KDObjective, object]:
    """The run's objective and its top-K cache (None under logits / text access). Chunks when the logits would be
    large (``losses.kd_chunk_tokens``), after checking that student and teacher form their logits as lm_head(hidden);
    refuses ``--kd-chunk 0`` where the unchunked loss cannot fit the memory here. Under a launcher every rank calls it
    (``team``): each writes its shard of a new cache (``topk_cache``). ``on_student(fn)``: runs a pass of the student
    (under FSDP on every rank, inside the sharded root's forward; by default ``fn()``)."""
    from ..config import topk_access
    from .losses import kd_chunk_tokens

    vocab = student.get_output_embeddings().weight.shape[0]
    tokens = cfg.batch_size * cfg.seq_len
    chunk = kd_chunk_tokens(cfg.kd_chunk, tokens, vocab) if cfg.teacher_access != "text" else 0
    if cfg.teacher_access != "text" and chunk == 0:
        check_unchunked_fits(tokens, vocab, device)
    if chunk:
        from ..models.lm_head import check_head

        probe = train_ids[:1, : min(8, cfg.seq_len)].to(device)
        (on_student or (lambda fn: fn()))(lambda: check_head(student, probe, "student"))
        check_head(teacher, probe, "teacher")
        reporter.note(f"KD loss in chunks of {chunk} tokens (a batch: {cfg.batch_size} × {cfg.seq_len} tokens × "
                      f"{vocab} vocabulary)")
    cache = None
    k = topk_access(cfg.teacher_access)
    if k is not None:
        from ..digests import tokenizer_digest, weights_digest
        from .distributed import Team
        from .topk_cache import Stamp, TopKCache, data_digest

        team = team or Team()

        def make_stamp() -> Stamp:  # hashing a large teacher's weights once, not once per rank
            return Stamp(teacher=weights_digest(teacher_dir), tokenizer=tokenizer_digest(cfg.tokenizer or teacher_dir),
                         data=data_digest(train_ids, heldout_ids), k=k, seq_len=cfg.seq_len,
                         vocab_size=vocab)

        directory = cfg.teacher_cache or default_cache_dir
        # the teacher pass runs per rank on its share of the rows: the batch of one process's forward passes
        cache = TopKCache.open_or_write(directory, team.on_main(make_stamp), teacher, train_ids, heldout_ids,
                                        use_k=operator.K, batch_size=max(1, cfg.batch_size // team.world),
                                        device=device, chunk=chunk, reporter=reporter, team=team)
    return KDObjective(operator, loss_fn, chunk, cache.train if cache is not None else None), cache


def check_unchunked_fits(tokens: int, vocab: int, device) -> None:
    """One line saying what to set when the unchunked loss of a batch would not fit the memory available here."""
    from .losses import KD_LOSS_COPIES, kd_chunk_tokens
    from .memory import available_bytes

    need = tokens * vocab * 4 * KD_LOSS_COPIES
    have = available_bytes(device)
    if have is not None and need > have:
        from ..errors import ConfigError

        raise ConfigError([f"the unchunked KD loss of a batch ({tokens} tokens × {vocab} vocabulary) needs about "
                           f"{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB available here; set "
                           f"--kd-chunk {kd_chunk_tokens(None, 2**62, vocab)} (or leave it out: automatic), or "
                           "lower --batch-size / --seq-len"])
