"""Gradual demolition inside a stage: what the stage's prune removes fades out over its first steps while the KD loss
trains the rest of the student, instead of disappearing at once.

A one-shot prune takes the removed channels' load away in one step and leaves recovery to rebuild it from a damaged
student. Here the stage's new zeros are first put back at their values before the prune and held there, frozen,
scaled by a factor that falls linearly from 1 to 0 over the first ``share`` of the stage's steps; the surviving
weights train against the teacher throughout, so they take the load over while it is still partly carried. When the
factor reaches 0 the masks hold exactly (every removed weight is zero, as after an ordinary prune) and the stage's
recovery continues under them.

For a channel pattern only the output projection's columns fade: a channel's contribution to the block's output is
then exactly ``factor ×`` its contribution before the prune (scaling its gate/up rows too would shrink it by a
nonlinear, faster curve through the activation). Its input rows are held at their old values until the end of the
fade, and are zeroed with the rest then. For the other patterns every newly removed weight fades.

Everything here is elementwise, so under FSDP (``--fsdp``) each rank holds and fades its own rows: the values before
the prune are its shard's (``mask_learning.learning_start``), the masks its rows of the whole masks every rank holds.
"""

from __future__ import annotations

import torch
from torch import nn

from .fsdp import local_part, local_tensor
from .pruner import Masks, Pruner


class Fade:
    """Holds a stage's newly removed weights at ``value before the prune × factor`` (see the module docstring).

    ``dense``: param name → the weight (or channel bias) before the stage's prune (this rank's shard of a sharded
    parameter); ``before`` / ``after``: the masks before and after it (whole). ``steps``: how many optimizer steps
    the factor takes to fall from 1 to 0."""

    def __init__(self, model: nn.Module, pruner: Pruner, dense: dict[str, torch.Tensor], before: Masks, after: Masks,
                 steps: int):
        if steps < 1:
            raise ValueError("a fade needs at least one step")
        self.steps = steps
        self.done = 0
        params = dict(model.named_parameters(remove_duplicate=False))
        scaled = {b.output.param_name for b in pruner.blocks} if pruner.blocks else None
        # name → (parameter, entries removed by this stage, their values before the prune, whether they fade)
        self._held: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, bool]] = []
        for name, keep in after.items():
            p = params[name]
            old = before.get(name)
            removed = ~keep if old is None else (old & ~keep)
            if not removed.any():
                continue
            removed = local_part(p, removed).to(p.device)
            values = torch.where(removed, dense[name].to(device=p.device, dtype=p.dtype), 0)
            self._held.append((p, removed, values, scaled is None or name in scaled))

    def factor(self) -> float:
        """The fading weights' scale after the steps done so far: 1 before the first step, 0 after the last."""
        return max(0.0, 1.0 - self.done / self.steps)

    @torch.no_grad()
    def hold(self) -> None:
        """Put the removed weights at their held values × the current factor (after the masks were enforced, or
        right after the prune); at factor 0 they are exactly zero, as the masks say."""
        f = self.factor()
        for p, removed, values, fades in self._held:
            scale = f if fades else (1.0 if f > 0 else 0.0)
            target = local_tensor(p)
            target.copy_(torch.where(removed, values * scale, target))

    def after_step(self) -> None:
        """Called after every optimizer step of the fade (the masks already enforced): the factor takes its next
        value."""
        self.done = min(self.done + 1, self.steps)
        self.hold()

    @property
    def finished(self) -> bool:
        return self.done >= self.steps
