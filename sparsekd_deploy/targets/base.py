"""One interface for every runtime: ``logits`` and ``generate``. Template methods: the public methods check
shapes and dtypes and the model's position limit, subclasses fill in ``_logits`` and ``_step``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SparseKDError
from ..numerics import draw, entropy, next_token_distribution, row_generators
from ..registry import Registry


class TargetError(SparseKDError):
    pass


TARGETS: Registry[type[Target]] = Registry("target")


@dataclass(frozen=True)
class ShapeLimits:
    """What an engine built for fixed shape ranges accepts (a TensorRT optimization profile's maxima).
    Rows beyond ``batch`` are run in chunks, transparently; longer sequences or pasts are refused clearly."""

    batch: int | None = None
    seq: int | None = None
    past: int | None = None

    @classmethod
    def from_profile(cls, profile: dict | None) -> ShapeLimits:
        profile = profile or {}
        return cls(*(profile.get(axis, {}).get("max") for axis in ("batch", "seq", "past")))


@dataclass
class DecodeState:
    last_logits: np.ndarray  # [B, V] logits of the last position
    past: object  # the runtime's KV cache (None without one)
    ids: np.ndarray  # every token seen so far


@dataclass
class Generation:
    tokens: np.ndarray  # [B, new_tokens] int64
    entropies: np.ndarray  # [B, new_tokens] nats of each step's sampling distribution (0 for greedy)


@dataclass
class SampledRows(Generation):
    """``Target.sample_repeated``'s rows, and how they were run."""

    chunks: int = 1
    rows_per_chunk: int = 0


class Target:
    """A runtime that can run a bundle's model."""

    name = "?"
    max_positions: int | None = None
    vocab_size: int | None = None
    limits = ShapeLimits()
    # Rows decoded at once by ``sample_repeated``: bounds the memory of the KV cache (1024 rows of the demo model's
    # 32 positions: ~130 MB in fp32) whatever ``validate --samples`` asks for.
    sample_rows: int = 1024

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = self._check_ids(input_ids)
        self._check_limits(ids.shape[1], 0)
        parts = [self._logits(ids[rows]) for rows in self._chunks(len(ids))]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)  # no copy of [B, L, V] when unchunked
        if out.shape[:2] != ids.shape:
            raise TargetError(f"{self.name} returned logits of shape {out.shape} for input {ids.shape}")
        return out

    def generate(self, prompt_ids: np.ndarray, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seeds: list[int] | None = None) -> Generation:
        """Greedy (temperature 0) or seeded sampling, one seed per row (row i always draws from seeds[i])."""
        ids = self._check_decode(prompt_ids, max_new_tokens)
        B = ids.shape[0]
        seeds = list(seeds) if seeds is not None else list(range(B))
        if len(seeds) != B:
            raise TargetError(f"{len(seeds)} seeds for {B} prompts")
        if self.limits.batch and B > self.limits.batch:
            # Each row draws from its own seed, so chunking changes no token.
            parts = [self.generate(ids[r], max_new_tokens, temperature, top_k, top_p, seeds[r]) for r in self._chunks(B)]
            return Generation(np.concatenate([g.tokens for g in parts]), np.concatenate([g.entropies for g in parts]))
        return self._decode(self._start(ids), max_new_tokens, temperature, top_k, top_p, row_generators(seeds))

    def sample_repeated(self, prompt_ids: np.ndarray, n: int, max_new_tokens: int, temperature: float,
                        seeds=None, top_k: int = 0, top_p: float = 1.0) -> SampledRows:
        """``n`` seeded samples of every prompt, rows grouped by prompt (n consecutive rows each). ``seeds``: one
        seed per sample, either [n] (row j of every prompt draws from ``seeds[j]``; default 0..n-1) or [P, n] (row j
        of prompt p draws from ``seeds[p][j]``: prompts that must not share random streams). Each prompt's prefix
        runs once and its KV cache is shared by its rows; rows run in chunks of at most ``sample_rows`` (and the
        profile's batch max), so any ``n`` fits. Each row keeps its own seed, so chunking changes no token."""
        ids = self._check_decode(prompt_ids, max_new_tokens)
        arr = np.arange(n, dtype=np.int64) if seeds is None else np.asarray(seeds, dtype=np.int64)
        if arr.ndim == 1:
            arr = np.broadcast_to(arr, (len(ids), len(arr)))
        if n < 1 or arr.ndim != 2 or arr.shape != (len(ids), n):
            raise TargetError(f"need n ≥ 1 and one seed per sample ([n] or [prompts, n]), got n={n} and seeds of "
                              f"shape {tuple(np.shape(seeds))} for {len(ids)} prompts")
        cap = min(x for x in (self.limits.batch, self.sample_rows) if x)
        prompt_of = np.repeat(np.arange(len(ids)), n)
        row_seeds = arr.reshape(-1).tolist()
        parts = []
        for rows in [slice(i, min(i + cap, len(prompt_of))) for i in range(0, len(prompt_of), cap)]:
            used, local = np.unique(prompt_of[rows], return_inverse=True)
            state = self._start(ids[used])
            past = self._gather_past(state.past, local) if state.past is not None else None
            if state.past is not None and past is None:  # this runtime cannot copy cache rows: run the prefix per row
                state = self._start(ids[prompt_of[rows]])
            else:
                state = DecodeState(state.last_logits[local], past, state.ids[local])
            parts.append(self._decode(state, max_new_tokens, temperature, top_k, top_p,
                                      row_generators(row_seeds[rows])))
        return SampledRows(np.concatenate([g.tokens for g in parts]), np.concatenate([g.entropies for g in parts]),
                           chunks=len(parts), rows_per_chunk=cap)

    def _decode(self, state: DecodeState, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                rngs: list) -> Generation:
        B = state.last_logits.shape[0]
        toks = np.zeros((B, max_new_tokens), dtype=np.int64)
        ents = np.zeros((B, max_new_tokens), dtype=np.float64)
        for t in range(max_new_tokens):
            last = state.last_logits
            if temperature <= 0:
                nxt = last.argmax(-1)
            else:
                p = next_token_distribution(last, temperature, top_k, top_p)
                ents[:, t] = entropy(p)
                nxt = draw(p, rngs)
            toks[:, t] = nxt
            if t + 1 < max_new_tokens:
                state = self._step(state, nxt[:, None].astype(np.int64))
        return Generation(toks, ents)

    def _check_decode(self, prompt_ids, max_new_tokens: int) -> np.ndarray:
        ids = self._check_ids(prompt_ids)
        if self.max_positions and ids.shape[1] + max_new_tokens > self.max_positions:
            raise TargetError(f"prompt ({ids.shape[1]}) + {max_new_tokens} new tokens exceeds the model's "
                              f"{self.max_positions} positions")
        # The last step runs with prompt + max_new_tokens - 2 cached positions.
        self._check_limits(ids.shape[1], max(0, ids.shape[1] + max_new_tokens - 2) if max_new_tokens > 1 else 0)
        return ids

    def _chunks(self, n: int) -> list[slice]:
        step = self.limits.batch or n
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _check_limits(self, seq: int, past: int) -> None:
        lim = self.limits
        if lim.seq and seq > lim.seq:
            raise TargetError(f"{seq}-token prompts exceed the engine profile's sequence max {lim.seq}: rebuild the "
                              f"engine with --seq 1,OPT,{seq} or more")
        if lim.past is not None and past > lim.past:
            raise TargetError(f"decoding needs {past} cached positions, the engine profile's past max is {lim.past}: "
                              f"rebuild the engine with --past 0,OPT,{past} or more")

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2 or 0 in ids.shape:
            raise TargetError(f"input_ids must be [batch, sequence] with batch, sequence ≥ 1, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TargetError(f"input_ids must be integers, got {ids.dtype}")
        if self.max_positions and ids.shape[1] > self.max_positions:
            raise TargetError(f"prompt of {ids.shape[1]} tokens exceeds the model's {self.max_positions} positions")
        if self.vocab_size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise TargetError(f"token ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return ids.astype(np.int64)

    # -- for subclasses ---------------------------------------------------------------------------------
    def _forward(self, ids: np.ndarray, past, past_len: int) -> tuple[np.ndarray, object]:
        """Run ``ids`` after ``past_len`` cached positions; return (float32 logits [B, L, V], new cache)."""
        raise NotImplementedError

    def _logits(self, ids: np.ndarray) -> np.ndarray:
        return self._forward(ids, None, 0)[0]

    def _gather_past(self, past, rows: np.ndarray):
        """The KV cache with its batch rows taken by index ``rows`` (repeats allowed), or None when this runtime
        cannot (then ``sample_repeated`` runs the prompt once per row instead of sharing its cache)."""
        return None

    def _start(self, ids: np.ndarray) -> DecodeState:
        logits, past = self._forward(ids, None, 0)
        return DecodeState(logits[:, -1], past, ids)

    def _step(self, state: DecodeState, next_ids: np.ndarray) -> DecodeState:
        logits, past = self._forward(next_ids, state.past, state.ids.shape[1])
        return DecodeState(logits[:, -1], past, np.concatenate([state.ids, next_ids], 1))

    def describe(self) -> dict:
        return {"runtime": self.name}


def make_target(name: str, model_path, **options) -> Target:
    # Import the plug-ins lazily: each pulls in its own runtime (onnxruntime, tensorrt, torch CUDA).
    import importlib

    module = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "torch": "torch_cuda"}.get(name)
    if module:
        importlib.import_module(f"{__package__}.{module}")
    return TARGETS.get(name)(model_path, **options)
