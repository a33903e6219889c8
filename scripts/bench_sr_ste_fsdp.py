"""SR-STE's per-step mask choice under --fsdp (``core/mask_learning.py``, ``core/fsdp_nm.py``): the old path (every
latent gathered whole, ranked by the main process, whole masks broadcast: ``MaskLearner(gather_all=True)``) against
the new one (each rank ranks its own rows; a partial stage gathers one score per group), side by side in one run on
2 gloo ranks (launched by this script with torchrun), on a seeded Llama built from a config.

Per stage kind (full 2:4; partial 2:4 at 90 % of the pattern, an earlier 70 % stage frozen) and path, the learner
runs the same steps from the same start: a seeded update of each weight stands in for the optimizer step (the same
on both paths), then ``after_step`` is timed. Printed per step: ``after_step``'s median seconds (rank 0; a collective
keeps the ranks in step), the bytes of the whole tensors the collectives assembled (gathered latents, broadcast masks
at one byte a weight, gathered per-group scores: what ``MaskLearner.traffic`` counts; each rank receives all but its
own share), and whether both paths ended with the same masks and flips.

    python scripts/bench_sr_ste_fsdp.py [--hidden 512 --intermediate 1536 --layers 4 --steps 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per stage kind and path (after one untimed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("hidden", "intermediate", "layers", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be ≥ 1")
    if args.hidden % 64:
        ap.error("--hidden must be a multiple of 64 (8 heads of a multiple of 8)")
    return args


def launch(argv: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, *argv]
    sys.exit(subprocess.run(cmd, env=env).returncode)


def run_path(team, model, pruner, dense, start_masks, frozen, norms, fraction, steps, gather_all, seed):
    """One learning phase from the same start; returns (after_step seconds per step, traffic, masks, flips)."""
    import torch

    from sparsekd_deploy.core.fsdp import local_part, local_tensor
    from sparsekd_deploy.core.mask_learning import MaskLearner
    from sparsekd_deploy.core.pruner import apply_masks

    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, d in dense.items():
            local_tensor(params[name]).copy_(d)
    apply_masks(model, start_masks)
    learner = MaskLearner(model, pruner, start_masks, fraction, norms, frozen=frozen, team=team,
                          gather_all=gather_all)
    learner.start(dense)
    seconds = []
    for step in range(steps + 1):
        learner.before_step()
        gen = torch.Generator().manual_seed(seed + step)
        with torch.no_grad():
            for name in sorted(learner.masks):
                p = params[name]
                local_tensor(p).add_(local_part(p, torch.randn(p.shape, generator=gen) * 0.02))
        torch.distributed.barrier()
        t0 = time.perf_counter()
        learner.after_step(lr=1e-3)
        if step:  # the first step is not timed (first collectives, allocations)
            seconds.append(time.perf_counter() - t0)
    traffic = {k: v / (steps + 1) for k, v in learner.traffic.items()}
    masks = learner.finish()
    return seconds, traffic, masks, learner.flips


def rank_main(args) -> None:
    import torch
    import transformers as tf

    from sparsekd_deploy.core.distributed import LossModule, Team
    from sparsekd_deploy.core.fsdp import gathered, shard_student
    from sparsekd_deploy.core.mask_learning import learning_start
    from sparsekd_deploy.core.patterns import NM
    from sparsekd_deploy.core.pruner import Pruner

    team = Team.launched()
    torch.manual_seed(args.seed)
    cfg = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=512, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg)
    root = LossModule(model, lambda ids, rows: model(input_ids=ids).logits.sum())
    shard_student(root, model, torch.device("cpu"), team.world)
    pruner = Pruner(model, NM(2, 4))
    dense = learning_start(model, pruner)
    scores = {ly.name: gathered(ly.module.weight).detach().abs() for ly in pruner.layers}  # (no Conv1D here)
    gen = torch.Generator().manual_seed(args.seed + 1)
    norms = {ly.name: torch.rand(ly.shape_oi[1], generator=gen) + 0.5 for ly in pruner.layers}
    prunable = sum(s.numel() for s in scores.values())
    if team.is_main:
        print(f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers: {prunable / 1e6:.1f} M "
              f"prunable weights in {len(pruner.layers)} layers (fp32 latents {prunable * 4 / 2**20:.0f} MiB), "
              f"2:4, 2 gloo ranks, {args.steps} timed steps per row, seed {args.seed}", flush=True)
        print("\n| stage | path | after_step s/step (median) | latents gathered MiB/step | masks broadcast MiB/step "
              "| scores gathered MiB/step | total MiB/step | same masks & flips as old |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, earlier, fraction in (("full 2:4", 0.5, 1.0), ("partial 2:4 @ 90 %", 0.7, 0.9)):
        frozen = pruner.stage_masks(scores, earlier)
        s = {ly.name: torch.where(frozen[ly.param_name], scores[ly.name], float("-inf")) for ly in pruner.layers}
        start = pruner.stage_masks(s, fraction)
        results = {}
        for path, gather_all in (("old: gather", True), ("new: rows", False)):
            results[path] = run_path(team, model, pruner, dense, start, frozen, norms, fraction, args.steps,
                                     gather_all, seed=args.seed + 10)
        old_masks, old_flips = results["old: gather"][2:]
        for path, (seconds, traffic, masks, flips) in results.items():
            same = flips == old_flips and all(torch.equal(masks[k], old_masks[k]) for k in old_masks)
            mib = {k: v / 2**20 for k, v in traffic.items()}
            if team.is_main:
                print(f"| {kind} | {path} | {statistics.median(seconds):.3f} | {mib['latent_bytes']:.1f} | "
                      f"{mib['mask_bytes']:.1f} | {mib['score_bytes']:.1f} | {sum(mib.values()):.1f} | {same} |",
                      flush=True)
        if team.is_main:
            (ot, *_), (nt, *_) = results["old: gather"], results["new: rows"]
            print(f"| {kind} | old / new | {statistics.median(ot) / statistics.median(nt):.1f}x | | | | | |", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        launch(argv)
    rank_main(args)


if __name__ == "__main__":
    main()
