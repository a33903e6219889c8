"""A causal LM split at its output head: final hidden states (after the last norm) and the ``lm_head`` weight.

The chunked KD loss (``core/losses.py``) needs the two apart so that it can form the logits a few tokens at a time.
That is only right for models whose logits are exactly ``lm_head(hidden)``: some architectures scale or soft-cap them
(Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``), so
:func:`check_head` compares the split against the model's own logits once before a run relies on it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the model's output projection."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ConfigError([f"{type(model).__name__} has no output head (lm_head) to compute the loss in chunks from; "
                           "pass --kd-chunk 0"])
    return head.weight, getattr(head, "bias", None)


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, L, H] hidden states that the output head turns into logits (the base model's last hidden state)."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def check_head(model: nn.Module, ids: torch.Tensor, role: str = "student") -> None:
    """Refuse the split when ``lm_head(final_hidden(ids))`` is not the model's own logits on ``ids`` (one short row)."""
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids).logits.float()
        weight, bias = output_head(model)
        split = nn.functional.linear(final_hidden(model, ids), weight, bias).float()
    finally:
        model.train(was_training)
    diff = (logits - split).abs().max().item() if split.shape == logits.shape else float("inf")
    tol = 1e-3 * max(1.0, logits.abs().max().item())
    if not diff <= tol:
        raise ConfigError([f"the {role} ({type(model).__name__}) does not compute its logits as lm_head(last hidden "
                           f"state) (max |difference| {diff:.3g}); the chunked KD loss cannot be used with it: "
                           "pass --kd-chunk 0"])
