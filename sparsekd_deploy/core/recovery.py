"""Recovery after a prune: distill the student back toward the teacher without making it worse.

Two rules (measured on the demo teacher with ``scripts/bench_recovery.py``; numbers in the README):

1. **The step size follows the damage.** Adam moves every weight by about ``lr`` per step even where the gradient is
   almost zero, so a student that a light prune left close to the teacher drifts away at an ``lr`` sized for heavy
   damage (10 % unstructured: KL 0.0002 after the prune, 0.0068 after 100 steps at 5e-4; 0.0001 at 1e-5). A stage's
   peak ``lr`` is ``cfg.lr · KL after the prune / FULL_LR_KL``, clamped to ``[MIN_LR_SCALE, 1] · cfg.lr``. Linear in
   the KL because that is what the demo measured: the best lr is ~1e-5 (0.02 ×) at KL 0.0002 and the full 5e-4 from
   KL ~0.016 up (a √KL rule, 0.45–0.67 × on the default 2:4 run's stages at KL 0.016–0.04, ended those runs worse).
2. **The post-prune state is a candidate.** Held-out KL is measured at a few checkpoints of the recovery and the stage
   keeps the best state it has seen, the state right after the prune included, so a stage never ends above its
   post-prune KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# KL right after a prune from which a stage trains at the full configured lr. On the demo, every stage of the default
# 2:4 run (KL 0.016–0.09 after its prune) does best at the full 5e-4 (shared/FINDINGS.md, scripts/bench_recovery.py).
FULL_LR_KL = 0.01
# Lower clamp of the lr scale: a stage never trains slower than 2 % of cfg.lr (1e-5 at the default).
MIN_LR_SCALE = 0.02
# Held-out measurements per recovery attempt (evenly spaced; the last one is the end of the attempt).
CHECKPOINTS = 4


def recovery_lr(base_lr: float, kl_after_prune: float) -> float:
    """Peak lr of a stage whose prune left the student at ``kl_after_prune`` (see rule 1)."""
    kl = max(kl_after_prune, 0.0) if math.isfinite(kl_after_prune) else FULL_LR_KL
    return base_lr * min(1.0, max(MIN_LR_SCALE, kl / FULL_LR_KL))


def cosine_lr(peak: float, step: int, total: int) -> float:
    """Cosine decay from ``peak`` to 10 % of it over ``total`` steps: high lr repairs, low lr settles the noise."""
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total)))


def checkpoint_steps(total: int, count: int = CHECKPOINTS) -> list[int]:
    """Steps (1..total) after which held-out KL is measured; always ends with ``total``."""
    return sorted({max(1, round(total * j / count)) for j in range(1, count + 1)})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters, copied to the CPU: the device holds the student once, not twice. Under FSDP each
    rank copies its own shards (fsdp.py), which is all ``restore`` puts back."""
    from .fsdp import local_tensor

    return {n: local_tensor(p).detach().to("cpu", copy=True) for n, p in model.named_parameters()}


@torch.no_grad()
def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a ``snapshot`` back into the model's parameters, on their device."""
    from .fsdp import local_tensor

    for n, p in model.named_parameters():
        target = local_tensor(p)
        target.copy_(state[n].to(target.device))


@dataclass
class Recovery:
    """The best held-out state of one stage; the state right after the prune is the first candidate (step 0)."""

    metrics: dict[str, float]  # held-out metrics of the best state
    step: int = 0  # training steps into the stage at which the best state was measured (0 = right after the prune)
    steps: int = 0  # steps trained so far in this stage
    checkpoints: list[list[float]] = field(default_factory=list)  # [step, held-out KL] of every measurement
    _state: dict[str, torch.Tensor] | None = None

    @classmethod
    def start(cls, model: nn.Module, metrics_after_prune: dict[str, float]) -> Recovery:
        rec = cls(dict(metrics_after_prune), checkpoints=[[0, metrics_after_prune["kl"]]])
        rec._state = snapshot(model)
        return rec

    def attempt(self, model: nn.Module, n: int, train: Callable[[int, int], None],
                measure: Callable[[], dict[str, float]]) -> bool:
        """Train ``n`` more steps as ``train(start, stop)`` segments of one ``n``-step schedule, measuring held-out
        metrics after each segment. Leaves the model in the best state seen in this stage; returns True when that
        meant going back to an earlier state (the caller resets the optimizer's moments)."""
        done = 0
        for stop in checkpoint_steps(n):
            train(done, stop)
            self.steps += stop - done
            done = stop
            m = measure()
            self.checkpoints.append([self.steps, m["kl"]])
            if m["kl"] < self.metrics["kl"]:  # a non-finite KL never wins
                self.metrics, self.step = dict(m), self.steps
                self._state = snapshot(model)
        if self.step == self.steps:
            return False
        restore(model, self._state)
        return True

    def offer(self, model: nn.Module, metrics: dict[str, float], steps: int) -> None:
        """A state that ``steps`` more steps of the stage reached outside ``attempt`` (a fade, demolition.py) is a
        candidate like a checkpoint of an attempt."""
        self.steps += steps
        self.checkpoints.append([self.steps, metrics["kl"]])
        if metrics["kl"] < self.metrics["kl"]:
            self.metrics, self.step = dict(metrics), self.steps
            self._state = snapshot(model)

    def release(self) -> None:
        """Drop the kept copy of the weights once the stage is decided."""
        self._state = None
