"""Teacher top-K cache on disk (``--teacher-access topk:K``): one pass of the teacher writes, for every position of
the training and held-out sequences, its K most likely token ids and their buckets — the K log-probs then the log of
the tail mass, exactly as ``numerics.bucket`` / the ``topk`` operator define them — after which the run trains and
measures with the teacher freed from memory. It is also the format for a black-box teacher that returns top-K
log-probs (an API): write its buckets with ``numerics.head_buckets``.

Layout of a cache dir::

    cache.json                                  format, stamp, splits → shards (written last: no cache.json = unfinished)
    <split>-<i>-of-<n>.idx.npy                  int32   [rows, seq_len, K]    token ids, most likely first
    <split>-<i>-of-<n>.logp.npy                 float32 [rows, seq_len, K+1]  K log-probs, then log tail mass

Shards: split ``train`` / ``heldout`` rows are cut into ``n`` contiguous shards, one per rank of the run that writes the
cache: rank r runs the teacher over shard r of each split (:func:`write_shard`, each file atomically: tmp file +
rename), so a launched run's teacher pass is split over its N processes, and the main process writes ``cache.json``
once every shard is there (:func:`finish`). A single process writes shard 0 of 1.

Reading is *not* by rank: every rank opens every shard, memory-mapped. Each step draws its global batch from all the
rows alike on every rank (``distributed.Team.shard`` gives rank r its share of that batch, not of the data), which is
what makes N ranks reproduce the 1-process run, and the main process measures the whole held-out split; a rank
reading only the rows it wrote would change the batches. A batch reads only its rows' pages, and drops them from the
process after copying (``madvise(MADV_DONTNEED)``), so a cache larger than memory costs a batch's worth of resident
memory, not the file's. All ranks must therefore see the cache dir (one node, or a shared filesystem); where the main
process cannot find a rank's shard, it says so.

The stamp holds hashes of the teacher's weights, of its tokenizer files and of the token ids, with K, the sequence
length and the vocabulary size; a cache whose stamp differs is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
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
    k: int  # outcomes kept per position (the teacher's K, at most the vocabulary: kd_objective.check_topk_sizes)
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


def _reserve(path: Path) -> None:
    """Allocate a memmap's (sparse) file on disk before writing through the map: on a full disk a store into an
    unbacked page kills the process with SIGBUS (no exception, no message, a stale lock left behind), whereas the
    allocation fails here as the OSError ENOSPC that the CLI reports in one line."""
    if not hasattr(os, "posix_fallocate"):  # (macOS, Windows): nothing to reserve with
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None


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
        _reserve(tmp_idx)
        _reserve(tmp_lp)
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


def finish(directory: Path, stamp: Stamp, rows: dict[str, int], count: int) -> None:
    """The main process, once every rank wrote its shard ``i`` of ``count`` of each split (``rows``: split → rows):
    check that all are there, then write the manifest. A shard missing here was written where this process cannot
    see it (a rank on another machine without a shared filesystem): said in one line, no manifest written."""
    splits = {}
    for split, n in rows.items():
        entries = []
        for i in range(count):
            name = shard_name(split, i, count)
            missing = [f"{name}{ext}" for ext in (".idx.npy", ".logp.npy") if not (directory / f"{name}{ext}").is_file()]
            if missing:
                raise TeacherCacheError(f"teacher cache {directory}: {missing[0]} (rank {i}'s shard) is not there; "
                                        "every rank writes its shard into the cache dir, so it must be on a filesystem "
                                        "all ranks share (pass --teacher-cache on one)")
            entries.append({"name": name, "rows": list(shard_rows(n, i, count))})
        splits[split] = {"rows": n, "shards": entries}
    write_manifest(directory, stamp, splits)


class _Mapped:
    """A ``.npy`` file as a read-only memory map whose pages a reader can drop from the process after use (``drop``):
    clean file pages stay in the kernel's page cache, but while mapped they count in the process's resident set, and
    a run that touches every row would end up holding the whole file there."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
            if fortran or dtype.hasobject:
                raise ValueError(f"{path.name} is not a C-ordered numeric array")
            size = int(np.prod(shape)) * dtype.itemsize
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if self._mm is not None and len(self._mm) < offset + size:
            raise ValueError(f"{path.name} is truncated")
        self.array = (np.ndarray(shape, dtype, buffer=self._mm, offset=offset) if self._mm is not None
                      else np.empty(shape, dtype))

    def drop(self) -> None:
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)


class CacheSplit:
    """One split's rows, read through memory maps; ``targets`` gives a batch's teacher buckets."""

    def __init__(self, directory: Path, entry: dict, ids: torch.Tensor, k: int, use_k: int, vocab: int | None = None):
        self.ids, self.k, self.use_k, self.vocab, self.directory = ids, k, use_k, vocab, directory
        self._shards = []  # (start, stop, idx map, logp map)
        L = ids.shape[1]
        try:
            if int(entry["rows"]) != len(ids):
                raise ValueError(f"{entry['rows']} rows, the run has {len(ids)}")
            covered = 0
            for sh in entry["shards"]:
                name = sh["name"]
                if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                    raise ValueError(f"shard name {name!r} is not a file name inside the cache")  # never read elsewhere
                start, stop = (int(v) for v in sh["rows"])
                idx_map = _Mapped(directory / f"{sh['name']}.idx.npy")
                lp_map = _Mapped(directory / f"{sh['name']}.logp.npy")
                idx, lp = idx_map.array, lp_map.array
                if idx.dtype != np.int32 or lp.dtype != np.float32:
                    raise ValueError(f"shard {sh['name']} holds {idx.dtype} / {lp.dtype} arrays")
                if idx.shape != (stop - start, L, k) or lp.shape != (stop - start, L, k + 1) or start != covered:
                    raise ValueError(f"shard {sh['name']} holds {idx.shape} / {lp.shape} for rows {start}..{stop}")
                covered = stop
                self._shards.append((start, stop, idx_map, lp_map))
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
        # torch-allocated (an allocator's statistics see them), filled through NumPy views
        idx_t = torch.empty((len(rows), self.ids.shape[1], self.k), dtype=torch.int64)
        lp_t = torch.empty((len(rows), self.ids.shape[1], self.k + 1), dtype=torch.float32)
        idx, lp = idx_t.numpy(), lp_t.numpy()
        for start, stop, i_map, l_map in self._shards:
            sel = np.nonzero((rows >= start) & (rows < stop))[0]
            if len(sel):
                idx[sel], lp[sel] = i_map.array[rows[sel] - start], l_map.array[rows[sel] - start]
                i_map.drop()
                l_map.drop()
        # A token id outside the vocabulary (a damaged shard whose header still reads) would fail deep in a gather.
        if self.vocab is not None and idx.size and (idx.min() < 0 or idx.max() >= self.vocab):
            raise TeacherCacheError(f"teacher cache {self.directory} is damaged (token ids outside the vocabulary of "
                                    f"{self.vocab}); delete it to rebuild it")
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
            if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
                raise ValueError(f"{MANIFEST} is not an object with splits")
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
        v = stamp.vocab_size
        return cls(directory, stamp, CacheSplit(directory, splits.get("train", {}), train_ids, k, use_k, v),
                   CacheSplit(directory, splits.get("heldout", {}), heldout_ids, k, k, v))

    @classmethod
    def open_or_write(cls, directory: Path, stamp: Stamp, teacher, train_ids: torch.Tensor,
                      heldout_ids: torch.Tensor, use_k: int, batch_size: int, device=None, chunk: int = 0,
                      reporter=None, team=None) -> TopKCache:
        """Reuse the cache at ``directory`` when its stamp matches (refuse it when not); else run the teacher once
        and write it: under a launcher (``team``, a ``distributed.Team``) every rank writes its shard of each split,
        then the main process the manifest. Every rank calls this; it returns once the cache is complete."""
        from .distributed import Team

        team = team or Team()
        directory = Path(directory)
        if team.on_main(lambda: (directory / MANIFEST).is_file()):  # one verdict for all ranks
            if reporter is not None:
                reporter.note(f"reusing the teacher top-{stamp.k} cache {directory}")
            return cls.open(directory, stamp, train_ids, heldout_ids, use_k)
        if reporter is not None:
            split_over = f", split over {team.world} processes" if team.distributed else ""
            reporter.note(f"writing the teacher top-{stamp.k} cache {directory} "
                          f"({len(train_ids) + len(heldout_ids)} × {stamp.seq_len} positions{split_over})")
        directory.mkdir(parents=True, exist_ok=True)
        for split, ids in zip(SPLITS, (train_ids, heldout_ids), strict=True):
            write_shard(directory, split, teacher, ids, stamp.k, team.rank, team.world, batch_size, device, chunk)
        team.wait("every rank's shard of the teacher top-K cache")
        team.on_main(finish, directory, stamp, {"train": len(train_ids), "heldout": len(heldout_ids)}, team.world)
        return cls.open(directory, stamp, train_ids, heldout_ids, use_k)
