"""One rank of tests/test_distributed.py's check that a failed sharded pass leaves the student sharded (started by
torchrun, never collected by pytest).

The tiny Llama is sharded as the distiller shards it; a pass run through ``fsdp.in_root`` (``on_student``'s path)
raises midway; then this rank zeroes its shard of the head, as a mask or a restore writes shards, and runs the
student twice. Then the sharded prune's scoring fails on the main process alone (``importance.score`` raises
there): every rank must get the failure (the main process its own error, the others ``FollowerError``), none left
waiting in a gather. Writes ``<out>/rank<r>.json``: whether the head is sharded again, the largest |logit| of each run
(0 when the write reached the weights the forward gathers) and what the failed prune raised on this rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny  # noqa: E402

from sparsekd_deploy.core import importance  # noqa: E402
from sparsekd_deploy.core.distributed import LossModule, Team  # noqa: E402
from sparsekd_deploy.core.fsdp import in_root, is_sharded, local_tensor, shard_student, sharded_prune_masks  # noqa: E402
from sparsekd_deploy.core.patterns import NM  # noqa: E402
from sparsekd_deploy.core.pruner import Pruner  # noqa: E402


def main(out: Path) -> None:
    team = Team.launched()
    student = build_tiny("llama")
    root = LossModule(student, lambda ids, rows: student(input_ids=ids).logits.sum())
    shard_student(root, student, torch.device("cpu"), team.world)
    ids = torch.ones(1, 4, dtype=torch.long)

    def fails_midway():
        student(input_ids=ids)
        raise ValueError("a pass that failed")

    try:
        in_root(root, fails_midway)
    except ValueError:
        pass
    sharded = is_sharded(student.lm_head.weight)
    with torch.no_grad():
        local_tensor(student.lm_head.weight).zero_()
        runs = [in_root(root, lambda: student(input_ids=ids).logits.abs().max().item()) for _ in range(2)]
    score = importance.score

    def fails_on_main(*a, **kw):
        if team.is_main:
            raise ValueError("scoring failed on the main process")
        return score(*a, **kw)

    importance.score = fails_on_main
    try:
        sharded_prune_masks(team, lambda fn: in_root(root, fn), student, Pruner(student, NM(2, 4)), "magnitude", 1.0,
                            [ids], {})
        raised = None
    except Exception as e:  # noqa: BLE001 - what reached this rank is the result
        raised = f"{type(e).__name__}: {e}"
    (out / f"rank{team.rank}.json").write_text(json.dumps({"sharded": sharded, "max_logit": runs, "prune": raised}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
