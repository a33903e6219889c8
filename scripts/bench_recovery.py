"""Issue 9 part 0: does a stage's recovery training end at or below the KL right after its prune?

Runs ``distill`` (the product path, data-free default) for each pattern × seed and prints, per stage, the held-out KL
right after the prune, at the end of the stage, the stage's peak learning rate and which recovery checkpoint was kept.
The distillation set of a seed is sampled once and reused by every run of that seed (the product samples the same
set for the same seed; sampling is most of a short run's time on 2 cores).

    .venv/bin/python scripts/bench_recovery.py --patterns unstructured:0.1 2:4 --stages 1 --steps 100 --seeds 0 1 2
    .venv/bin/python scripts/bench_recovery.py --patterns 2:4 --seeds 0 1 2          # the default 3-stage 2:4 run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core import teacher as teacher_mod
from sparsekd_deploy.core.distill import distill

_orig_build_data = teacher_mod.build_data
_cache: dict = {}


def _cached_build_data(cfg, teacher, tokenizer):
    key = (cfg.seed, cfg.data, cfg.num_samples, cfg.heldout_samples, cfg.seq_len)
    if key not in _cache:
        _cache[key] = _orig_build_data(cfg, teacher, tokenizer)
    return _cache[key]


teacher_mod.build_data = _cached_build_data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", nargs="+", default=["unstructured:0.1", "2:4"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stages", type=int, default=None, help="default: the config's")
    ap.add_argument("--steps", type=int, default=None, help="steps per stage; default: the config's")
    ap.add_argument("--kl-budget", type=float, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in args.patterns:
            for seed in args.seeds:
                opts = {"pattern": pattern, "seed": seed, "out": str(Path(tmp) / f"{pattern}-{seed}".replace(":", "_"))}
                for key, val in (("stages", args.stages), ("steps_per_stage", args.steps), ("kl_budget", args.kl_budget)):
                    if val is not None:
                        opts[key] = val
                start = time.perf_counter()
                res = distill(build_config(None, opts), overwrite=True)
                stages = [{k: s.get(k) for k in ("label", "kl_after_prune", "kl", "lr", "best_step", "steps", "accepted")}
                          for s in res.trajectory[1:]]
                final = [s for s in res.trajectory if s["accepted"]][-1]["kl"]
                rows.append({"pattern": pattern, "seed": seed, "final_kl": final, "stages": stages,
                             "seconds": round(time.perf_counter() - start, 1)})
                trail = "; ".join(f"{s['label']}: {s['kl_after_prune']:.4f} → {s['kl']:.4f}"
                                  + (f" (lr {s['lr']:.2e}, kept step {s['best_step']})" if s.get("lr") else "")
                                  for s in stages)
                print(f"{pattern:18s} seed {seed}  final {final:.4f}  [{trail}]  {rows[-1]['seconds']}s", flush=True)
    print()
    for pattern in args.patterns:
        kls = [r["final_kl"] for r in rows if r["pattern"] == pattern]
        print(f"{pattern:18s} mean final held-out KL {statistics.mean(kls):.4f} over seeds {args.seeds}: "
              + " ".join(f"{k:.4f}" for k in kls))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
