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


def pairwise_agreement(samples: list[tuple[int, ...]], m: int) -> float:
    # Σ_c k_c(k_c - 1) / (N(N - 1)) over the distinct heads c: the share of ordered (= unordered) pairs that agree,
    # in O(N) instead of the O(N²) pair list (N is in the hundreds with `validate --samples`).
    n = len(samples)
    if n < 2:
        return 1.0
    return sum(k * (k - 1) for k in Counter(s[:m] for s in samples).values()) / (n * (n - 1))


def modal_share(samples: list[tuple[int, ...]], m: int) -> float:
    heads = Counter(s[:m] for s in samples)
    return heads.most_common(1)[0][1] / len(samples) if samples else 1.0


def distinct_2(samples: list[tuple[int, ...]]) -> float:
    grams = [tuple(s[i : i + 2]) for s in samples for i in range(len(s) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def per_prompt(tokens, entropies, n_per_prompt: int, m: int) -> dict[str, list[float]]:
    """Each statistic of :func:`summarize`, one value per prompt (the unit a bootstrap resamples), plus
    ``jitter@m`` = 1 - pairwise_agreement@m: the chance that two answers to the same prompt differ in their first m
    tokens. ``tokens``/``entropies`` [P*N, L] (NumPy arrays or torch tensors), N consecutive rows per prompt."""
    rows = [tuple(r) for r in tokens.tolist()]
    ents = entropies.tolist()
    groups = range(0, len(rows), n_per_prompt)
    agree = [pairwise_agreement(rows[i : i + n_per_prompt], m) for i in groups]
    return {
        f"pairwise_agreement@{m}": agree,
        f"modal_share@{m}": [modal_share(rows[i : i + n_per_prompt], m) for i in groups],
        "distinct_2": [distinct_2(rows[i : i + n_per_prompt]) for i in groups],
        "mean_entropy": [sum(map(sum, ents[i : i + n_per_prompt])) / sum(map(len, ents[i : i + n_per_prompt]))
                         for i in groups],
        f"jitter@{m}": [1.0 - a for a in agree],
    }


def summarize(tokens, entropies, n_per_prompt: int, m: int) -> dict[str, float]:
    """``tokens``/``entropies`` [P*N, L] (NumPy arrays or torch tensors), rows grouped by prompt (N consecutive
    rows per prompt)."""
    stats = per_prompt(tokens, entropies, n_per_prompt, m)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        f"pairwise_agreement@{m}": mean(stats[f"pairwise_agreement@{m}"]),
        f"modal_share@{m}": mean(stats[f"modal_share@{m}"]),
        "distinct_2": mean(stats["distinct_2"]),
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
