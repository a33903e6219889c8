"""Repeat-prompt consistency: how much the answers to one prompt jitter across samples.

Per prompt, N samples of L tokens at temperature τ:
- ``pairwise_agreement@m``: share of sample pairs whose first m tokens are identical;
- ``modal_share@m``: share of samples equal to the most common first-m continuation;
- ``distinct_2``: distinct bigrams / all bigrams over the samples (lower = more repetitive across samples);
- ``mean_entropy``: mean entropy (nats) of the sampling distribution along the sampled paths.
Consistency only means something beside KL: a collapsed model is "consistent" too.

``summarize`` takes NumPy arrays or torch tensors and needs no torch (the device-side validation calls it);
``measure`` samples a PyTorch model.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations


def pairwise_agreement(samples: list[tuple[int, ...]], m: int) -> float:
    heads = [s[:m] for s in samples]
    pairs = list(combinations(heads, 2))
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0


def modal_share(samples: list[tuple[int, ...]], m: int) -> float:
    heads = Counter(s[:m] for s in samples)
    return heads.most_common(1)[0][1] / len(samples) if samples else 1.0


def distinct_2(samples: list[tuple[int, ...]]) -> float:
    grams = [tuple(s[i : i + 2]) for s in samples for i in range(len(s) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarize(tokens, entropies, n_per_prompt: int, m: int) -> dict[str, float]:
    """``tokens``/``entropies`` [P*N, L] (NumPy arrays or torch tensors), rows grouped by prompt (N consecutive
    rows per prompt)."""
    rows = [tuple(r) for r in tokens.tolist()]
    groups = [rows[i : i + n_per_prompt] for i in range(0, len(rows), n_per_prompt)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        f"pairwise_agreement@{m}": mean([pairwise_agreement(g, m) for g in groups]),
        f"modal_share@{m}": mean([modal_share(g, m) for g in groups]),
        "distinct_2": mean([distinct_2(g) for g in groups]),
        "mean_entropy": float(entropies.mean()),
    }


def measure(model, prompts, n: int, length: int, temperature: float, m: int, seed: int = 0):
    """Sample every prompt ``n`` times (one batch, one seeded generator) and summarise."""
    import torch

    from .sampling import sample

    batch = prompts.repeat_interleave(n, dim=0)
    gen = torch.Generator().manual_seed(seed)
    toks, ents = sample(model, batch, length, temperature, gen)
    return summarize(toks, ents, n, m)
