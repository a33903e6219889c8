"""Seeded sampling from a PyTorch causal LM with the KV cache, returning per-step entropies.

Used to build the data-free distillation set from the teacher and to measure repeat-prompt consistency.
"""

from __future__ import annotations

import torch


def sample_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next-token distribution at ``temperature`` (0 → greedy one-hot)."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


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
        probs = sample_probs(logits, temperature)
        ents.append(entropy(probs).cpu())
        # Draw on the CPU with an explicit generator: the same seed gives the same text on every device.
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        toks.append(nxt.cpu())
        if step + 1 < new_tokens:
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(toks, 1), torch.stack(ents, 1)
