"""One rank of tests/test_distributed.py's gradient-sync check, started by torchrun (never collected by pytest).

Each rank trains a tiny Llama on its *own* rows with the chunked KD loss (the path that calls the student's base model
and lm_head outside ``student.forward``) for a few AdamW steps, prepared by Accelerate exactly as the distiller
prepares it, then writes ``<out>/rank<r>.json``:

- ``wrapped``: the loss as the DDP-wrapped ``LossModule``'s forward (what the distiller does) → weights identical;
- ``bypassed``: the same loss called on the unwrapped student (DDP's forward skipped) → no gradient averaging, so
  the ranks drift apart: proof that the identity check can fail;
- ``follower_error``: what this rank raised when the main process failed inside ``Team.on_main``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny  # noqa: E402

from sparsekd_deploy.core.distributed import LossModule, Team  # noqa: E402
from sparsekd_deploy.core.kd_objective import KDObjective  # noqa: E402
from sparsekd_deploy.core.losses import make_loss  # noqa: E402
from sparsekd_deploy.core.operators import make_operator  # noqa: E402
from sparsekd_deploy.errors import ConfigError  # noqa: E402


def train(team: Team, wrapped: bool, steps: int = 3) -> bool:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    teacher = build_tiny("llama")
    student = build_tiny("llama").train()
    kd = KDObjective(make_operator("power:2"), make_loss("forward-kl"), chunk=8)
    module = LossModule(student, lambda ids, rows: kd(student, teacher, ids, rows))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    prepared, optimizer = accelerator.prepare(module, optimizer)
    gen = torch.Generator().manual_seed(100 + team.rank)  # each rank its own rows
    for _ in range(steps):
        ids = torch.randint(256, (2, 16), generator=gen)
        loss = prepared(ids) if wrapped else kd(student, teacher, ids)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return team.same_weights(student)


def main(out: Path) -> None:
    team = Team.launched()
    result = {"world": team.world, "wrapped": train(team, True), "bypassed": train(team, False)}

    def fail():
        raise ConfigError(["a problem only the main process sees"])

    try:
        team.on_main(fail)
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        result["follower_error"] = [type(e).__name__, str(e), getattr(e, "exit_code", None)]
    (out / f"rank{team.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
