"""Greedy decode speed of the graph being validated, measured on the runtime that validates it: one reference
prompt (batch 1), the references' greedy length, a few timed runs, the median. Recorded beside the quality metrics
so ``inspect`` and ``scripts/results_table.py`` can show each precision's speed where it was measured — a number
of this machine and runtime (the record names both), never compared across records as if side by side."""

from __future__ import annotations

import statistics
import time

import numpy as np

RUNS = 3


def decode_speed(target, prompt: np.ndarray, new_tokens: int, runs: int = RUNS) -> dict:
    """``prompt``: [1, L] token ids. The caller has run the target before (the first call pays for allocation)."""
    target.generate(prompt, 1)  # warm-up: a run that allocates the cache for this prompt length
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        target.generate(prompt, new_tokens)
        rates.append(new_tokens / (time.perf_counter() - start))
    return {"tokens_per_s": float(statistics.median(rates)), "runs_tokens_per_s": [float(r) for r in rates],
            "new_tokens": int(new_tokens), "prompt_tokens": int(prompt.shape[1]), "batch": 1}
