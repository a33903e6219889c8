"""Teacher top-K cache on disk (``--teacher-access topk:K``): one pass of the teacher writes, for every position of
the training and held-out sequences, its K most likely token ids and their buckets — the K log-probs then the log of
the tail mass, exactly as ``numerics.bucket`` / the ``topk`` operator define them — after which the run trains and
measures with the teacher freed from memory. It is also the format for a black-box teacher that returns top-K
log-probs (an API): write its buckets with ``numerics.head_buckets``.

Layout of a cache dir::

    cache.json                                  format, stamp, splits → shards (written last: no cache.json = unfinished)
    <split>-<i>-of-<n>.idx.npy                  int32   [rows, seq_len, K]    token ids, most likely first
    <split>-<i>-of-<n>.logp.npy                 float32 [rows, seq_len, K+1]  K log-probs, then log tail mass

Shards: split ``train`` / ``heldout`` rows are cut into ``n`` contiguous shards so each rank of a distributed run can
write its own (:func:`write_shard`, atomically: tmp file + rename) and the main process writes ``cache.json`` once all
are there (:func:`write_manifest`). Today one process writes shard 0 of 1. Arrays are NumPy ``.npy`` files opened as
memory maps: a batch reads its rows only.

The stamp holds hashes of the teacher's weights, of its tokenizer files and of the token ids, with K, the sequence
length and the vocabulary size; a cache whose stamp differs is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import TeacherCacheError
from ..fsutil import atomic_target, write_json_atomic
from ..numerics import head_buckets_torch, log_softmax_torch, topk_bucket_torch

FORMAT = 1
MANIFEST = "cache.json"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Stamp:
    teacher: str  # digests.weights_digest of the teacher dir
    tokenizer: str  # digests.tokenizer_digest ("none" for a data-free run without tokenizer files)
    data: str  # data_digest of the token ids (train, then held-out)
    k: int  # outcomes kept per position (the teacher's K, capped at the vocabulary)
    seq_len: int
    vocab_size: int

    LABELS = {"teacher": "teacher weights", "tokenizer": "tokenizer", "data": "data (token ids)", "k": "K",
              "seq_len": "sequence length", "vocab_size": "vocabulary size"}

    def differences(self, other: Stamp) -> list[str]:
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                short = (lambda v: v[:12] + "…" if isinstance(v, str) and len(v) > 12 else v)  # noqa: E731
                out.append(f"{self.LABELS[f.name]} ({short(theirs)} in the cache, {short(mine)} here)")
        return out


def data_digest(*ids: torch.Tensor) -> str:
    """sha256 over token-id tensors (shape and int64 values), in order."""
    h = hashlib.sha256()
    for t in ids:
        a = np.ascontiguousarray(t.detach().cpu().numpy().astype(np.int64))
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}"


def shard_rows(n_rows: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous rows [start, stop) of shard ``index`` of ``count`` (the first ``n_rows % count`` get one more)."""
    base, extra = divmod(n_rows, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@torch.no_grad()
def teacher_buckets(teacher, ids: torch.Tensor, k: int, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx [B, L, K], buckets [B, L, K+1]) of the teacher on ``ids``; with ``chunk`` > 0 the logits are formed
    ``chunk`` tokens at a time from its final hidden states (the full [tokens × vocab] logits never exist)."""
    if not chunk:
        return topk_bucket_torch(log_softmax_torch(teacher(input_ids=ids).logits.float()), k)
    from ..models.lm_head import final_hidden, output_head

    hidden = final_hidden(teacher, ids)
    w, b = output_head(teacher)
    h = hidden.reshape(-1, hidden.shape[-1])
    parts = [topk_bucket_torch(log_softmax_torch(torch.nn.functional.linear(h[s:s + chunk], w, b).float()), k)
             for s in range(0, len(h), chunk)]
    idx, buckets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return idx.view(*ids.shape, -1), buckets.view(*ids.shape, -1)


def write_shard(directory: Path, split: str, teacher, ids: torch.Tensor, k: int, index: int = 0, count: int = 1,
                batch_size: int = 8, device=None, chunk: int = 0) -> dict:
    """Run the teacher over this shard's rows of ``ids`` [N, L] and write them, each file atomically; returns the
    shard's manifest entry. Memory: one batch of teacher outputs at a time (the arrays are written through memmaps)."""
    start, stop = shard_rows(len(ids), index, count)
    name = shard_name(split, index, count)
    rows, L = stop - start, ids.shape[1]
    device = device or next(teacher.parameters()).device
    teacher.eval()
    with atomic_target(directory / f"{name}.idx.npy") as tmp_idx, atomic_target(directory / f"{name}.logp.npy") as tmp_lp:
        idx_mm = np.lib.format.open_memmap(tmp_idx, mode="w+", dtype=np.int32, shape=(rows, L, k))
        lp_mm = np.lib.format.open_memmap(tmp_lp, mode="w+", dtype=np.float32, shape=(rows, L, k + 1))
        for s in range(0, rows, batch_size):
            e = min(rows, s + batch_size)
            idx, buckets = teacher_buckets(teacher, ids[start + s : start + e].to(device), k, chunk)
            idx_mm[s:e] = idx.to(torch.int32).cpu().numpy()
            lp_mm[s:e] = buckets.float().cpu().numpy()
        idx_mm.flush()
        lp_mm.flush()
        del idx_mm, lp_mm
    return {"name": name, "rows": [start, stop]}


def write_manifest(directory: Path, stamp: Stamp, splits: dict[str, dict]) -> None:
    """``splits``: {split: {"rows": N, "shards": [entries of write_shard]}}; written last, atomically."""
    write_json_atomic(directory / MANIFEST, {"format": FORMAT, "stamp": asdict(stamp), "splits": splits})


class CacheSplit:
    """One split's rows, read through memory maps; ``targets`` gives a batch's teacher buckets."""

    def __init__(self, directory: Path, entry: dict, ids: torch.Tensor, k: int, use_k: int):
        self.ids, self.k, self.use_k = ids, k, use_k
        self._shards = []  # (start, stop, idx memmap, logp memmap)
        L = ids.shape[1]
        try:
            if int(entry["rows"]) != len(ids):
                raise ValueError(f"{entry['rows']} rows, the run has {len(ids)}")
            covered = 0
            for sh in entry["shards"]:
                start, stop = (int(v) for v in sh["rows"])
                idx = np.load(directory / f"{sh['name']}.idx.npy", mmap_mode="r")
                lp = np.load(directory / f"{sh['name']}.logp.npy", mmap_mode="r")
                if idx.shape != (stop - start, L, k) or lp.shape != (stop - start, L, k + 1) or start != covered:
                    raise ValueError(f"shard {sh['name']} holds {idx.shape} / {lp.shape} for rows {start}..{stop}")
                covered = stop
                self._shards.append((start, stop, idx, lp))
            if covered != len(ids):
                raise ValueError(f"shards cover {covered} of {len(ids)} rows")
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise TeacherCacheError(f"teacher cache {directory} is damaged ({e}); delete it to rebuild it") from None
        self._row_of: dict[bytes, int] | None = None

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Row numbers of sequences given by content (the calibration batches of taylor importance): identical
        sequences have identical teacher outputs, so the first match is the right one."""
        if self._row_of is None:
            self._row_of = {}
            for i, row in enumerate(self.ids.numpy()):
                self._row_of.setdefault(row.tobytes(), i)
        try:
            return torch.tensor([self._row_of[r.tobytes()] for r in ids.detach().cpu().numpy().astype(np.int64)])
        except KeyError:
            raise TeacherCacheError("a batch holds a sequence that is not in the teacher cache") from None

    def targets(self, rows: torch.Tensor | None = None, ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx int64 [B, L, K'], buckets float32 [B, L, K'+1]) of the rows (or of ``ids`` found by content), with
        K' = the operator's K: its buckets are the first K' outcomes and the rest as its tail (``head_buckets``)."""
        rows = self.rows_of(ids) if rows is None else rows
        rows = rows.cpu().numpy()
        idx = np.empty((len(rows), self.ids.shape[1], self.k), np.int64)
        lp = np.empty((len(rows), self.ids.shape[1], self.k + 1), np.float32)
        for start, stop, i_mm, l_mm in self._shards:
            sel = np.nonzero((rows >= start) & (rows < stop))[0]
            if len(sel):
                idx[sel], lp[sel] = i_mm[rows[sel] - start], l_mm[rows[sel] - start]
        idx_t, lp_t = torch.from_numpy(idx), torch.from_numpy(lp)
        if self.use_k < self.k:
            return idx_t[..., : self.use_k].contiguous(), head_buckets_torch(lp_t[..., : self.use_k])
        return idx_t, lp_t


class TopKCache:
    """An opened, stamp-checked cache: ``train`` and ``heldout`` splits."""

    def __init__(self, directory: Path, stamp: Stamp, train: CacheSplit, heldout: CacheSplit):
        self.directory, self.stamp, self.train, self.heldout = directory, stamp, train, heldout

    @classmethod
    def open(cls, directory: Path, stamp: Stamp, train_ids: torch.Tensor, heldout_ids: torch.Tensor,
             use_k: int) -> TopKCache:
        """Open an existing cache, refusing one whose stamp differs from ``stamp`` (the message names what)."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            if manifest.get("format") != FORMAT:
                raise TeacherCacheError(f"teacher cache {directory} has format {manifest.get('format')!r}, this "
                                        f"version reads {FORMAT}; delete it to rebuild it")
            saved = Stamp(**manifest["stamp"])
            splits = manifest["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, TeacherCacheError):
                raise
            raise TeacherCacheError(f"teacher cache {directory} is damaged ({e}); delete it to rebuild it") from None
        diff = stamp.differences(saved)
        if diff:
            raise TeacherCacheError(f"teacher cache {directory} was made with another {'; '.join(diff)}; pass another "
                                    "--teacher-cache dir (or delete this one to rebuild it)")
        k = stamp.k
        return cls(directory, stamp, CacheSplit(directory, splits.get("train", {}), train_ids, k, use_k),
                   CacheSplit(directory, splits.get("heldout", {}), heldout_ids, k, k))

    @classmethod
    def open_or_write(cls, directory: Path, stamp: Stamp, teacher, train_ids: torch.Tensor,
                      heldout_ids: torch.Tensor, use_k: int, batch_size: int, device=None, chunk: int = 0,
                      reporter=None) -> TopKCache:
        """Reuse the cache at ``directory`` when its stamp matches (refuse it when not); else run the teacher once
        and write it (every shard, then the manifest)."""
        directory = Path(directory)
        if (directory / MANIFEST).is_file():
            if reporter is not None:
                reporter.note(f"reusing the teacher top-{stamp.k} cache {directory}")
            return cls.open(directory, stamp, train_ids, heldout_ids, use_k)
        if reporter is not None:
            reporter.note(f"writing the teacher top-{stamp.k} cache {directory} "
                          f"({len(train_ids) + len(heldout_ids)} × {stamp.seq_len} positions)")
        directory.mkdir(parents=True, exist_ok=True)
        splits = {}
        for split, ids in zip(SPLITS, (train_ids, heldout_ids), strict=True):
            entry = write_shard(directory, split, teacher, ids, stamp.k, 0, 1, batch_size, device, chunk)
            splits[split] = {"rows": len(ids), "shards": [entry]}
        write_manifest(directory, stamp, splits)
        return cls.open(directory, stamp, train_ids, heldout_ids, use_k)
