"""One rank of tests/test_distributed.py's sharded top-K cache check, started by torchrun (never collected by pytest).

Every rank calls ``TopKCache.open_or_write`` on the same teacher and rows, as the distiller's ranks do; each records
the shards it wrote (``write_shard`` wrapped) and the teacher buckets it then reads for rows of both ranks' shards,
into ``<out>/rank<r>.json``. The cache itself is left in ``<out>/cache`` for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny  # noqa: E402

from sparsekd_deploy.core import topk_cache  # noqa: E402
from sparsekd_deploy.core.distributed import Team  # noqa: E402

ROWS, HELD, L, K = 6, 3, 8, 8
READ = [0, 5, 2]  # rows of shard 0 (0..2) and shard 1 (3..5)


def ids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 256, (ROWS, L), generator=g), torch.randint(3, 256, (HELD, L), generator=g)


def main(out: Path) -> None:
    team = Team.launched()
    wrote = []
    original = topk_cache.write_shard

    def recording(directory, split, teacher, rows, k, index=0, count=1, *args, **kwargs):
        wrote.append([split, index, count])
        return original(directory, split, teacher, rows, k, index, count, *args, **kwargs)

    topk_cache.write_shard = recording
    train, held = ids()
    stamp = topk_cache.Stamp("t", "none", topk_cache.data_digest(train, held), K, L, 256)
    cache = topk_cache.TopKCache.open_or_write(out / "cache", stamp, build_tiny("llama"), train, held, use_k=K,
                                               batch_size=2, team=team)
    idx, lp = cache.train.targets(torch.tensor(READ))
    (out / f"rank{team.rank}.json").write_text(json.dumps({"world": team.world, "wrote": wrote,
                                                           "idx": idx.tolist(), "logp": lp.tolist()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
