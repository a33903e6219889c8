"""One rank of tests/test_distributed.py's check of channel pruning's defaults under FSDP (started by torchrun, never
collected by pytest).

Per case (tiny Llama; tiny Llama with a chunked Fisher loss; tiny GPT-2, whose Conv1D output projection is stored
[channels, hidden], so its shards cut channels), a seeded student is sharded as the distiller shards it and pruned
to channels:0.5 by ``fsdp_channels.sharded_prune_stage`` with fisher + ls; the main process prunes an unsharded copy
of the same student with the single-process ``stage.prune_stage``. Writes ``<out>/rank<r>.json``: per case, whether
every rank's masks equal the single-process masks, the largest |weight difference| of the gathered student from the
single-process one, and how many refitted columns moved from the dense weights (so the refit is known to have run)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny  # noqa: E402

from sparsekd_deploy.core.distributed import LossModule, Team  # noqa: E402
from sparsekd_deploy.core.fsdp import full_state, in_root, shard_student  # noqa: E402
from sparsekd_deploy.core.fsdp_channels import sharded_prune_stage  # noqa: E402
from sparsekd_deploy.core.patterns import Channels  # noqa: E402
from sparsekd_deploy.core.pruner import Pruner  # noqa: E402
from sparsekd_deploy.core.stage import prune_stage  # noqa: E402

CASES = [("llama", None), ("llama", 8), ("gpt2", None)]


def case(team: Team, family: str, chunk: int | None) -> dict:
    student = build_tiny(family)
    reference = copy.deepcopy(student)
    dense = {k: v.clone() for k, v in student.state_dict().items()}
    calib = list(torch.randint(0, student.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))
                 .split(4))
    root = LossModule(student, lambda ids, rows: student(input_ids=ids).logits.sum())
    shard_student(root, student, torch.device("cpu"), team.world)
    pattern = Channels(0.5)
    masks = sharded_prune_stage(team, lambda fn: team.share(in_root(root, fn)), root, student,
                                Pruner(student, pattern), "fisher", 1.0, calib, {}, compensation="ls", chunk=chunk)
    state = full_state(student)
    out = {"masks_equal": None, "max_weight_diff": None, "refit_columns": None}
    ref_masks = team.share(prune_stage(reference, Pruner(reference, pattern), "fisher", 1.0, calib, {}, kd_loss=None,
                                       compensation="ls", chunk=chunk) if team.is_main else None)
    out["masks_equal"] = sorted(masks) == sorted(ref_masks) and all(torch.equal(masks[k], ref_masks[k]) for k in masks)
    if team.is_main:
        ref = reference.state_dict()
        out["max_weight_diff"] = max((state[k].float() - ref[k].float()).abs().max().item() for k in state)
        pruner = Pruner(reference, pattern)
        keeps = pruner.channel_keeps(ref_masks)
        moved = 0
        for b in pruner.blocks:
            w = ref[b.output.param_name]
            w0 = dense[b.output.param_name]
            cols = (w - w0).abs().amax(1 if b.output.transposed else 0) > 1e-3
            moved += int((cols & keeps[b.name]).sum())
        out["refit_columns"] = moved
    return out


def main(out: Path) -> None:
    team = Team.launched()
    torch.manual_seed(0)
    results = {f"{family}-chunk{chunk}": case(team, family, chunk) for family, chunk in CASES}
    (out / f"rank{team.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
