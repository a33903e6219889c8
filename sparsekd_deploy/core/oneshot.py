"""One-shot pruning: score once and prune straight to the pattern, no training — the baseline that staged SparseKD
is measured against (and, followed by plain KD, "one-shot + KD")."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import DistillConfig


def one_shot(cfg: DistillConfig, importance: str):
    """Prepare a distiller for ``cfg`` (teacher, student, data, run dir), prune its student to the full target by
    ``importance`` scored on the calibration batches, and return the distiller (``.raw`` is the pruned student,
    ``.masks`` its masks, ``.measure()`` the held-out metrics)."""
    from .distill import StagedDistiller
    from .rundir import RunDir
    from .stage import prune_stage

    d = StagedDistiller(cfg)
    d.run = RunDir(cfg.out)
    d.run.prepare(False, True)
    d._setup(False)
    calib = list(d.train_ids[: cfg.calib_batches * cfg.batch_size].split(cfg.batch_size))
    # The calibration batches are CPU slices of the training set; taylor's KD loss runs on the student's device.
    d.masks = prune_stage(d.raw, d.pruner, importance, 1.0, calib, {}, kd_loss=lambda ids: d.loss_on(ids.to(d.device)),
                          compensation=cfg.compensation, chunk=d.kd_chunk)
    return d
