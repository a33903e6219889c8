"""Probability-domain softening operators F.

Each operator maps a teacher distribution P and a student distribution Q onto the same (softened) outcome
space; the KD loss compares the two there. Working in the probability domain (log-probs in, log-probs out)
means a teacher that only exposes probabilities, or top-k probabilities, works the same as one with logits.

Axioms (tested with hypothesis): identity at T=1 / λ=0 / K=V, ranking preserved, entropy non-decreasing in
T / λ, uniform in the limit. Top-k is a coarse-graining, not a softening: it keeps the K most likely teacher
outcomes and merges the rest into one tail bucket; KL on buckets is a lower bound of the full KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..numerics import LOG_FLOOR, bucket_torch, log_softmax_torch, topk_bucket_torch
from ..registry import Registry, split_spec

OPERATORS: Registry[type[Operator]] = Registry("softening operator")


class Operator:
    """Base class. ``pair`` maps (teacher, student) log-probs to softened log-probs in one outcome space."""

    spec: str = ""

    def apply(self, logp: torch.Tensor) -> torch.Tensor:
        """Soften one distribution (log-probs over the last dim)."""
        raise NotImplementedError

    def pair(self, logp_teacher: torch.Tensor, logq_student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(logp_teacher), self.apply(logq_student)

    @property
    def loss_scale(self) -> float:
        """Multiplier on the loss; T² for the power operator keeps gradient size independent of T (Hinton)."""
        return 1.0


@OPERATORS.register("power")
@dataclass
class Power(Operator):
    """F(p) = p^(1/T) / Z, i.e. softmax(z / T) for logits z."""

    T: float = 1.0

    def __post_init__(self):
        if not (self.T > 0 and math.isfinite(self.T)):
            raise ConfigError([f"power:T needs a finite T > 0, got {self.T}"])
        self.spec = f"power:{self.T:g}"

    def apply(self, logp):
        return log_softmax_torch(logp / self.T).clamp_min(LOG_FLOOR)

    @property
    def loss_scale(self):
        return self.T**2


@OPERATORS.register("mix")
@dataclass
class Mix(Operator):
    """F(p) = (1-λ) p + λ / V: mixing with the uniform distribution."""

    lam: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError([f"mix:λ needs 0 ≤ λ ≤ 1, got {self.lam}"])
        self.spec = f"mix:{self.lam:g}"

    def apply(self, logp):
        if self.lam == 0.0:
            return logp.clamp_min(LOG_FLOOR)
        V = logp.shape[-1]
        uniform = torch.full_like(logp, math.log(self.lam) - math.log(V))
        if self.lam == 1.0:
            return uniform
        return torch.logaddexp(logp + math.log1p(-self.lam), uniform).clamp_min(LOG_FLOOR)


@OPERATORS.register("topk")
@dataclass
class TopK(Operator):
    """Keep the teacher's K most likely outcomes and merge the rest into one tail bucket (K+1 outcomes)."""

    K: int = 32

    def __post_init__(self):
        if self.K < 1:
            raise ConfigError([f"topk:K needs K ≥ 1, got {self.K}"])
        self.spec = f"topk:{self.K}"

    # The buckets (tail clamp, LOG_FLOOR) are numerics.bucket_torch: the same as the recorded references and
    # the validation metric kl_topk.
    def apply(self, logp):
        return topk_bucket_torch(logp, self.K)[1]

    def pair(self, logp_teacher, logq_student):
        idx, P = topk_bucket_torch(logp_teacher, self.K)
        return P, bucket_torch(logq_student, idx)


def make_operator(spec: str) -> Operator:
    """'power:2', 'mix:0.1', 'topk:32' -> operator. 'power' alone means T=1."""
    name, arg = split_spec(spec)
    cls = OPERATORS.get(name)
    if arg is None:
        return cls()
    try:
        value = int(arg) if cls is TopK else float(arg)
    except ValueError:
        raise ConfigError([f"operator {spec!r}: {arg!r} is not a number"]) from None
    return cls(value)
