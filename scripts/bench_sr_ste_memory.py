"""Memory of an SR-STE training step (``core/mask_learning.py``): the peak bytes of live CPU tensors
(``core.memory.TensorBytes``, the CPU twin of ``torch.cuda.max_memory_allocated``) over each of a few steps —
forward + backward, then ``before_step`` / AdamW step / ``after_step`` — on a Llama built from a config (seeded),
its prunable weights 2:4 by magnitude and learned from their dense values. Prints the peaks, the flips and a hash
of the weights after the steps, so two checkouts can be compared side by side (same hash: same numbers).

    .venv/bin/python scripts/bench_sr_ste_memory.py
"""

from __future__ import annotations

import hashlib

import torch
import transformers as tf

from sparsekd_deploy.core.mask_learning import MaskLearner, learning_start
from sparsekd_deploy.core.memory import TensorBytes
from sparsekd_deploy.core.patterns import NM
from sparsekd_deploy.core.pruner import Pruner, apply_masks


def main(steps: int = 3) -> None:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=512, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg)
    pruner = Pruner(model, NM(2, 4))
    dense = learning_start(model, pruner)
    masks = pruner.stage_masks({ly.name: ly.weight_oi().detach().abs() for ly in pruner.layers}, 1.0)
    apply_masks(model, masks)
    learner = MaskLearner(model, pruner, masks, 1.0, input_norms=None)
    learner.start(dense)
    del dense
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    prunable = sum(ly.module.weight.numel() * ly.module.weight.element_size() for ly in pruner.layers) / 2**20
    peaks = []
    for _ in range(steps):
        with TensorBytes() as tb:
            model(input_ids=ids, labels=ids).loss.backward()
            backward = tb.peak
            learner.before_step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            learner.after_step(1e-3)
        peaks.append(f"{backward / 2**20:.2f} / {tb.peak / 2**20:.2f}")
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
    print(f"prunable weights {prunable:.2f} MB; peak MB per step (forward + backward / whole step): "
          f"{', '.join(peaks)}; flips {learner.flips}; weights sha256 {digest}")


if __name__ == "__main__":
    main()
