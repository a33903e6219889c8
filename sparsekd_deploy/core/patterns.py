"""Sparsity patterns: which weights a stage removes, given importance scores.

Scores and masks here are in the *[out, in]* layout, ``in`` being the reduction (input-features) axis
that TensorRT and cuSPARSELt need the n:m pattern on. The adapter (``models/adapters.py``) converts GPT-2's
transposed ``Conv1D`` weights to and from this layout.

A pattern is reached in stages: ``fraction`` ∈ (0, 1] is how much of the final pattern a stage applies.
Weights already pruned carry score -inf, so later stages only ever add zeros (masks are monotone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import Registry, split_spec

PATTERNS: Registry[type[Pattern]] = Registry("pattern")


class Pattern:
    spec: str
    structured: bool = False  # True: removes whole MLP channels (see ``channel_keep``)

    def skip_reason(self, out_features: int, in_features: int) -> str | None:
        """Why a layer of this shape cannot carry the pattern, or None if it can."""
        return None

    def keep_mask(self, scores: torch.Tensor, fraction: float) -> torch.Tensor:
        """Bool mask [out, in]: True = keep. ``fraction`` of the final pattern is applied."""
        raise NotImplementedError

    def holds(self, weight_oi: torch.Tensor) -> bool:
        """Does a weight (in [out, in] layout) satisfy the final pattern?"""
        return True

    def target_sparsity(self) -> float:
        raise NotImplementedError


@PATTERNS.register("nm")
@dataclass
class NM(Pattern):
    """n:m: at most n non-zeros in every m consecutive weights along the input-features axis."""

    n: int = 2
    m: int = 4

    def __post_init__(self):
        if not (1 <= self.n < self.m):
            raise ConfigError([f"pattern {self.n}:{self.m}: need 1 ≤ n < m"])
        self.spec = f"{self.n}:{self.m}"

    def skip_reason(self, out_features, in_features):
        if in_features % self.m:
            return f"in_features {in_features} is not a multiple of {self.m}"
        return None

    def keep_mask(self, scores, fraction):
        out_f, in_f = scores.shape
        groups = scores.reshape(-1, self.m)
        full, rem = self.zeros_per_group(groups.shape[0], fraction)
        order = groups.argsort(dim=-1, stable=True)  # ascending importance
        prune_rank = torch.full((groups.shape[0],), full, dtype=torch.long, device=scores.device)
        if rem:
            prune_rank[self.next_scores(groups, order, full).argsort(stable=True)[:rem]] += 1
        return self.keep_groups(order, prune_rank).reshape(out_f, in_f)

    # keep_mask's parts, also used on a shard's rows (mask_learning.py): only the (full+1)-th weakest score of each
    # group and the layer-wide ``rem`` choice among them need the whole layer.
    def zeros_per_group(self, groups: int, fraction: float) -> tuple[int, int]:
        """Zeros spread evenly over a layer of ``groups`` groups: every group gets ``full`` zeros, the ``rem`` groups
        whose next-weakest weight is weakest get one more. At fraction 1 this is exactly n:m (``rem`` 0)."""
        return divmod(round(fraction * (self.m - self.n) * groups), groups) if groups else (0, 0)

    @staticmethod
    def next_scores(groups: torch.Tensor, order: torch.Tensor, full: int) -> torch.Tensor:
        """Per group ([G, m], ``order`` its ascending stable argsort), the score of its (full+1)-th weakest weight."""
        return groups.gather(1, order[:, full : full + 1]).squeeze(1)

    def keep_groups(self, order: torch.Tensor, prune_rank: torch.Tensor) -> torch.Tensor:
        """Bool [G, m]: each group keeps all but its ``prune_rank`` weakest weights (``order`` as above)."""
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(self.m, device=order.device).expand(order.shape[0], -1).contiguous())
        return ranks >= prune_rank[:, None]

    def holds(self, weight_oi):
        if weight_oi.shape[1] % self.m:
            return False
        nnz = (weight_oi.reshape(-1, self.m) != 0).sum(-1)
        return bool((nnz <= self.n).all())

    def target_sparsity(self):
        return 1 - self.n / self.m


@PATTERNS.register("unstructured")
@dataclass
class Unstructured(Pattern):
    """Remove the lowest-scoring fraction S of each layer's weights."""

    sparsity: float = 0.5

    def __post_init__(self):
        if not 0.0 < self.sparsity < 1.0:
            raise ConfigError([f"unstructured:S needs 0 < S < 1, got {self.sparsity}"])
        self.spec = f"unstructured:{self.sparsity:g}"

    def keep_mask(self, scores, fraction):
        k = round(fraction * self.sparsity * scores.numel())
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        if k:
            keep[scores.flatten().argsort(stable=True)[:k]] = False
        return keep.view_as(scores)

    def holds(self, weight_oi):
        return (weight_oi == 0).float().mean().item() >= self.sparsity - 1.0 / weight_oi.numel()

    def target_sparsity(self):
        return self.sparsity


@PATTERNS.register("channels")
@dataclass
class Channels(Pattern):
    """Structured: remove the same fraction S of intermediate MLP channels in every layer; the student is
    physically shrunk at the end, so it reloads as a smaller standard model that is faster on every runtime."""

    sparsity: float = 0.25
    structured = True

    def __post_init__(self):
        if not 0.0 < self.sparsity < 1.0:
            raise ConfigError([f"channels:S needs 0 < S < 1, got {self.sparsity}"])
        self.spec = f"channels:{self.sparsity:g}"

    def channels_to_remove(self, intermediate: int, fraction: float) -> int:
        return min(intermediate - 1, round(fraction * self.sparsity * intermediate))

    def channel_keep(self, channel_scores: torch.Tensor, fraction: float) -> torch.Tensor:
        k = self.channels_to_remove(channel_scores.numel(), fraction)
        keep = torch.ones(channel_scores.numel(), dtype=torch.bool, device=channel_scores.device)
        if k:
            keep[channel_scores.argsort(stable=True)[:k]] = False
        return keep

    def target_sparsity(self):
        return self.sparsity


def is_auto(spec: str) -> bool:
    """``unstructured:auto`` / ``channels:auto``: the run searches the sparsity (see core/auto_search.py)."""
    return isinstance(spec, str) and spec.strip().endswith(":auto")


def make_pattern(spec: str) -> Pattern:
    """'2:4' / 'n:m', 'unstructured:0.5', 'channels:0.25'."""
    name, arg = split_spec(spec)
    if name.isdigit() and arg is not None and arg.isdigit():
        return NM(int(name), int(arg))
    cls = PATTERNS.get(name)
    if cls is NM:
        raise ConfigError([f"pattern {spec!r}: write n:m, e.g. 2:4"])
    if arg is None:
        return cls()
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError([f"pattern {spec!r}: {arg!r} is not a number"]) from None
    if not math.isfinite(value):
        raise ConfigError([f"pattern {spec!r}: {arg!r} is not finite"])
    return cls(value)


def pattern_names() -> list[str]:
    return ["n:m (e.g. 2:4)", "unstructured:S", "channels:S"]
