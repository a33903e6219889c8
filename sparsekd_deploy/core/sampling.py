"""Seeded sampling from a PyTorch causal LM with the KV cache, returning per-step entropies.

Used to build the data-free distillation set from the teacher and to measure repeat-prompt consistency.
The distribution, its entropy and the draw are numerics' (the runtime targets use their NumPy twins).
"""

from __future__ import annotations

import torch

from ..numerics import draw_torch, entropy_torch, next_token_distribution_torch


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``new_tokens`` after each row of ``prompt_ids`` [B, P] (all rows the same length).

    Returns (tokens [B, new_tokens], entropy in nats of each step's sampling distribution [B, new_tokens]).
    """
    model.eval()
    device = next(model.parameters()).device
    ids = prompt_ids.to(device)
    out = model(input_ids=ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    toks, ents = [], []
    for step in range(new_tokens):
        probs = next_token_distribution_torch(logits.float(), temperature)  # temperature 0: greedy one-hot
        ents.append(entropy_torch(probs).cpu())
        # Drawn on the CPU with the explicit generator: the same seed gives the same text on every device.
        nxt = draw_torch(probs, generator).to(device)
        toks.append(nxt.cpu())
        if step + 1 < new_tokens:
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(toks, 1), torch.stack(ents, 1)
