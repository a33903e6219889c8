"""The numerics shared by training, export checks and validation, implemented once.

Every quantity here has a NumPy function (``name``) and, where training or the PyTorch side needs it, a PyTorch
twin (``name_torch``) with the same semantics; ``tests/test_numerics.py`` checks each pair against the other.
Distributions are log-probabilities (or probabilities) over the last axis; reductions are over that axis only,
so callers choose the mean (over positions, prompts, ...).

A leaf module: it imports nothing from the package, NumPy at the top and PyTorch only inside the ``*_torch``
functions, so the device-side validation path (NumPy outputs of an ONNX Runtime / TensorRT target) runs
without PyTorch installed.

Precision: the NumPy functions work in float64 (``log_softmax`` upcasts; validation is not memory-bound); the
PyTorch twins keep their input's dtype, so each caller picks it (the KD loss runs in float32).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Floor for log-probabilities that enter a loss or a bucketed KL: exp(-100) ≈ 4e-44 is below float32's
# smallest normal number (1.2e-38), so only probabilities too small to matter are raised, while 0·log 0 terms
# stay finite in the value and in its gradient, and a student's near-zero probability on a teacher bucket
# costs at most 100 nats per unit of teacher mass instead of inf.
LOG_FLOOR = -100.0

# Top-k + tail bucket: the log-mass of the K kept outcomes is clamped to at most -1e-7, i.e. the tail bucket
# keeps a mass of at least 1 - e^(-1e-7) ≈ 1e-7. Why this value: float32 machine epsilon is 1.19e-7, so a
# head mass summed in float32 (the teacher references are stored in float32) is only known to about 1e-7 and
# a smaller tail is rounding noise; clamping both sides (teacher and student) at the same level means two
# distributions that both keep all their mass in the top K compare equal instead of differing by rounding
# noise; and the tail stays finite (log 0 = -inf) when the top K hold all the mass. One constant for the
# training operator, the recorded references and the validation metric.
HEAD_LOGMASS_MAX = -1e-7


# -- log-softmax ---------------------------------------------------------------------------------------------
def log_softmax(z: np.ndarray) -> np.ndarray:
    """Log-probabilities of logits ``z`` over the last axis, in float64."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def log_softmax_torch(z: torch.Tensor) -> torch.Tensor:
    """Twin of :func:`log_softmax`, in ``z``'s dtype (cast before calling to choose the precision)."""
    return z.log_softmax(-1)


# -- KL over the whole vocabulary ----------------------------------------------------------------------------
def kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(P‖Q) = Σ p (log p - log q) over the last axis, from log-probs; one value per position.

    Inputs must be finite where p > 0 matters: a -inf in ``logp`` gives 0·(-inf) = nan (floor at
    :data:`LOG_FLOOR` first, as the operators and the buckets do)."""
    return (np.exp(logp) * (logp - logq)).sum(-1)


def kl_torch(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Twin of :func:`kl` (differentiable: the KD losses use it)."""
    return (logp.exp() * (logp - logq)).sum(-1)


# -- top-k + tail bucket -------------------------------------------------------------------------------------
def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def bucket(logp: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Coarse-grain ``logp`` [..., V] onto the outcomes ``idx`` [..., K] plus one tail bucket holding the rest.

    Returns log-probs [..., K+1]: the K gathered values, then log(1 - Σ p_kept) with the head log-mass clamped at
    :data:`HEAD_LOGMASS_MAX`; every entry floored at :data:`LOG_FLOOR`."""
    return head_buckets(np.take_along_axis(logp, idx, -1))


def head_buckets(top: np.ndarray) -> np.ndarray:
    """Buckets [..., K+1] from K log-probs of a distribution alone (its top K, as a top-K teacher cache or an API
    teacher that returns top-K log-probs gives them): the K values, then the tail bucket log(1 - Σ p_kept) with the
    head log-mass clamped at :data:`HEAD_LOGMASS_MAX`; every entry floored at :data:`LOG_FLOOR`. ``bucket`` is this
    applied to the gathered outcomes, so a cached teacher and a teacher in memory give the same buckets."""
    head = np.minimum(_logsumexp(top), HEAD_LOGMASS_MAX)
    tail = np.log(-np.expm1(head))
    return np.maximum(np.concatenate([top, tail], -1), LOG_FLOOR)


def bucket_torch(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Twin of :func:`bucket` (differentiable)."""
    return head_buckets_torch(logp.gather(-1, idx))


def head_buckets_torch(top: torch.Tensor) -> torch.Tensor:
    """Twin of :func:`head_buckets` (differentiable)."""
    import torch

    head = top.logsumexp(-1, keepdim=True).clamp(max=HEAD_LOGMASS_MAX)
    tail = torch.log(-torch.expm1(head))
    return torch.cat([top, tail], -1).clamp_min(LOG_FLOOR)


def topk_bucket_torch(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logp``'s own K most likely outcomes (K capped at V) and its buckets on them: (idx [..., K], [..., K+1])."""
    idx = logp.topk(min(k, logp.shape[-1]), dim=-1).indices
    return idx, bucket_torch(logp, idx)


def bucket_kl(p_buckets: np.ndarray, logq: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """KL over top-k buckets: KL(P_b‖Q_b) per position, where ``p_buckets`` [..., K+1] are the teacher's buckets on
    its top-k outcomes ``idx`` and Q_b = bucket(``logq``, ``idx``) the student's mass on the same buckets.
    A lower bound of the full-vocabulary KL (data-processing inequality), up to the clamps above."""
    return kl(p_buckets, bucket(logq, idx))


def bucket_kl_torch(p_buckets: torch.Tensor, logq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Twin of :func:`bucket_kl`."""
    return kl_torch(p_buckets, bucket_torch(logq, idx))


# -- entropy -------------------------------------------------------------------------------------------------
def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of probabilities ``p`` over the last axis. 0·log 0 counts as 0: p is clamped at the dtype's
    smallest normal number inside the log (any p below it contributes less than 1e-300 nats)."""
    p = np.asarray(p)
    return -(p * np.log(np.maximum(p, np.finfo(p.dtype).tiny))).sum(-1)


def entropy_torch(p: torch.Tensor) -> torch.Tensor:
    """Twin of :func:`entropy`."""
    import torch

    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)


# -- sampling ------------------------------------------------------------------------------------------------
def next_token_distribution(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """[..., V] logits -> float64 probabilities after temperature, top-k and nucleus (top-p) filtering.

    temperature ≤ 0 is greedy: the one-hot of the argmax. top_k = 0 or ≥ V keeps everything; logits tied with the
    k-th largest are kept too. top_p keeps the smallest prefix, in descending probability (ties in index order),
    whose mass reaches top_p, and always at least one token."""
    z = np.asarray(logits, dtype=np.float64)
    V = z.shape[-1]
    if temperature <= 0:
        return (np.arange(V) == z.argmax(-1)[..., None]).astype(np.float64)
    z = z / temperature
    if top_k and top_k < V:
        kth = np.partition(z, -top_k, axis=-1)[..., [-top_k]]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(-1, keepdims=True)
    return p


def next_token_distribution_torch(logits: torch.Tensor, temperature: float, top_k: int = 0,
                                  top_p: float = 1.0) -> torch.Tensor:
    """Twin of :func:`next_token_distribution`, in ``logits``' dtype."""
    import torch

    V = logits.shape[-1]
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), V).to(logits.dtype)
    z = logits / temperature
    if top_k and top_k < V:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = z.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
        drop_sorted = sorted_p.cumsum(-1) - sorted_p >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        p = p.masked_fill(drop, 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p


def row_generators(seeds: list[int]) -> list[np.random.Generator]:
    """One NumPy generator per row: row i always draws from ``seeds[i]``, so splitting a batch into chunks (or
    running a row alone) draws the same tokens."""
    return [np.random.default_rng(s) for s in seeds]


def draw(p: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One token per row of ``p`` [B, V], row i drawn with ``rngs[i]`` (see :func:`row_generators`)."""
    return np.array([rng.choice(p.shape[-1], p=p[i]) for i, rng in enumerate(rngs)], dtype=np.int64)


def draw_torch(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] -> [B, 1] (on the CPU), the whole batch from one generator.

    Drawn on the CPU with an explicit generator: the same seed gives the same tokens on every device. (The
    NumPy :func:`draw` uses another generator, so the two twins agree in distribution, not token for token.)"""
    import torch

    return torch.multinomial(probs.cpu(), 1, generator=generator)


# -- stability: distances between next-token distributions, calibration, intervals ----------------------------
def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total variation distance ½ Σ |p - q| over the last axis (probabilities); one value per position, in [0, 1]."""
    return 0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum(-1)


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins on [0, 1]:
    Σ_b (n_b / n) · |accuracy_b - mean confidence_b|. A confidence of exactly 1 falls in the last bin."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=np.float64).ravel()
    if conf.size == 0:
        return float("nan")
    b = np.minimum((conf * bins).astype(np.int64), bins - 1)
    gap = np.abs(np.bincount(b, ok, minlength=bins) - np.bincount(b, conf, minlength=bins))  # n_b·|acc_b - conf_b|
    return float(gap.sum() / conf.size)


@dataclass(frozen=True)
class Bootstrap:
    """A bootstrap interval: ``low``/``high`` (None when no resample gave a finite statistic: never NaN), how many of
    the ``resamples`` were dropped because their statistic was not finite (e.g. a ratio whose denominator resampled
    to 0), and the method that made it."""

    low: float | None
    high: float | None
    dropped: int
    resamples: int
    method: str


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _normal_ppf(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


def bootstrap(statistic, n_units: int, resamples: int = 2000, seed: int = 0, level: float = 0.95,
              method: str = "bca") -> Bootstrap:
    """Bootstrap interval of ``statistic(idx)``, where ``idx`` is a resample (with replacement) of the ``n_units``
    independent units' indices. Seeded: the same seed and ``n_units`` draw the same resamples, so two statistics of
    paired data (teacher and student on the same prompts) and their ratio see the same resamples. Resamples whose
    statistic is not finite are dropped and counted (``dropped``); none finite gives (None, None).

    ``method="bca"`` (the default): bias-corrected and accelerated (Efron & Tibshirani 1993, 14.3; as
    ``scipy.stats.bootstrap(method="BCa")``): the bias correction z0 = Φ⁻¹(share of resamples below the full-sample
    statistic, ties counted half), the acceleration a from the jackknife over units (leave one unit out:
    a = Σ d³ / (6 (Σ d²)^1.5), d = mean - θ₍ᵢ₎), and the interval at the adjusted levels
    Φ(z0 + (z0 + z_α) / (1 - a (z0 + z_α))) of the resamples. With few units a percentile interval is too narrow and
    off-centre for skewed statistics (ratios); BCa corrects both to second order. ``method="percentile"``: the plain
    percentile interval."""
    if method not in ("bca", "percentile"):
        raise ValueError(f"unknown bootstrap method {method!r} (bca, percentile)")
    if n_units <= 0:
        return Bootstrap(None, None, resamples, resamples, method)
    idx = np.random.default_rng(seed).integers(0, n_units, size=(resamples, n_units))
    vals = np.array([statistic(i) for i in idx], dtype=np.float64)
    finite = np.isfinite(vals)
    dropped, vals = int((~finite).sum()), vals[finite]
    if vals.size == 0:
        return Bootstrap(None, None, dropped, resamples, method)
    tail = (1.0 - level) / 2
    levels = [tail, 1.0 - tail]
    if method == "bca" and n_units >= 2:
        levels = _bca_levels(statistic, n_units, vals, tail)
    lo, hi = np.quantile(vals, levels)
    return Bootstrap(float(lo), float(hi), dropped, resamples, method)


def _bca_levels(statistic, n_units: int, vals: np.ndarray, tail: float) -> list[float]:
    """The BCa-adjusted quantile levels of the resampled statistics ``vals`` (finite) for a two-sided interval
    with ``tail`` on each side; the plain levels where the full-sample statistic is not finite."""
    theta = float(statistic(np.arange(n_units)))
    if not math.isfinite(theta):
        return [tail, 1.0 - tail]
    # Ties within rounding (a statistic constant across resamples) count as ties, not as "below".
    tol = 1e-12 * max(1.0, abs(theta))
    below = np.count_nonzero(vals < theta - tol) + 0.5 * np.count_nonzero(np.abs(vals - theta) <= tol)
    # Clipped to one half-resample from either end: θ outside every resample would give z0 = ±∞.
    share = min(max(below / vals.size, 0.5 / vals.size), 1.0 - 0.5 / vals.size)
    z0 = _normal_ppf(share)
    keep = np.ones(n_units, dtype=bool)
    jack = []
    for i in range(n_units):
        keep[i] = False
        jack.append(statistic(np.flatnonzero(keep)))
        keep[i] = True
    jack = np.asarray(jack, dtype=np.float64)
    jack = jack[np.isfinite(jack)]
    d = jack.mean() - jack if jack.size >= 2 else np.zeros(1)
    den = 6.0 * float((d**2).sum()) ** 1.5
    a = float((d**3).sum()) / den if den > 0 else 0.0
    out = []
    for z_alpha in (_normal_ppf(tail), _normal_ppf(1.0 - tail)):
        num = z0 + z_alpha
        denom = 1.0 - a * num
        level = _normal_cdf(z0 + num / denom) if denom > 0 else (0.0 if num < 0 else 1.0)
        out.append(min(max(level, 0.0), 1.0))
    return out


def bootstrap_interval(statistic, n_units: int, resamples: int = 2000, seed: int = 0, level: float = 0.95,
                       method: str = "bca") -> tuple[float | None, float | None]:
    """(low, high) of :func:`bootstrap` (None, None when no resample gave a finite statistic)."""
    b = bootstrap(statistic, n_units, resamples, seed, level, method)
    return b.low, b.high
