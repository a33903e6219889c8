"""core.oneshot: the one-shot baseline the benchmarks compare staged SparseKD against."""

import torch

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core.oneshot import one_shot

GOLDEN_KL = 0.049663  # held-out KL of the magnitude-pruned tiny Llama (fast_cfg, seed 0, CPU fp32)


def test_one_shot_prunes_straight_to_the_pattern_without_training(tiny_dirs, fast_cfg):
    cfg = build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "pattern": "2:4"})
    d = one_shot(cfg, "magnitude")
    assert len(d.masks) == len(d.pruner.layers)
    for ly in d.pruner.layers:  # every group of 4 inputs keeps exactly 2 weights
        w = ly.weight_oi().detach()
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert torch.all(groups <= 2)
    held = d.measure()
    assert abs(held["kl"] - GOLDEN_KL) < 1e-4  # seeded: pruned, not trained
