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


def test_taylor_scoring_runs_the_loss_on_the_students_device(tiny_dirs, fast_cfg, monkeypatch):
    """The calibration batches are CPU slices of the training set; taylor's KD loss must get them on the distiller's
    device (on a GPU, CPU ids into the student's embedding fail: "two devices"). The meta device stands in for the
    GPU as the distiller's device; the loss itself is a stand-in that records where its ids are."""
    from sparsekd_deploy.core.distill import StagedDistiller

    setup, seen = StagedDistiller._setup, []

    def setup_then_meta(self, resuming):
        out = setup(self, resuming)
        self.device = torch.device("meta")
        return out

    def loss_on(self, ids, rows=None):
        seen.append(ids.device.type)
        return sum((ly.module.weight ** 2).sum() for ly in self.pruner.layers)  # differentiable in every layer

    monkeypatch.setattr(StagedDistiller, "_setup", setup_then_meta)
    monkeypatch.setattr(StagedDistiller, "loss_on", loss_on)
    cfg = build_config(None, {**fast_cfg, "teacher": str(tiny_dirs["llama"]), "pattern": "2:4"})
    one_shot(cfg, "taylor")
    assert seen and set(seen) == {"meta"}
