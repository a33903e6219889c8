"""One rank of tests/test_distributed.py's check of SR-STE's masks chosen on each rank's rows under FSDP (started by
torchrun, never collected by pytest).

Per case, a seeded student is sharded as the distiller shards it and an unsharded copy stays whole; both learn their
masks (``MaskLearner``) for a few steps from the same start — masks of an earlier stage frozen, seeded input norms —
and each step's update is the same seeded noise (the whole tensor on the copy, each rank's rows of it on the shards),
standing in for the optimizer step. Writes ``<out>/rank<r>.json``: per case, whether this rank's final masks equal
the single-process learner's, both flip counts, and how many whole latents (``gathered_like`` in mask_learning.py)
and per-group score tensors (``gathered_rows`` in fsdp_nm.py) the steps gathered — counted by wrapping the functions
the learner calls, not read from its own record."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
from conftest import VOCAB, build_tiny  # noqa: E402

from sparsekd_deploy.core import fsdp_nm, mask_learning  # noqa: E402
from sparsekd_deploy.core.distributed import LossModule, Team  # noqa: E402
from sparsekd_deploy.core.fsdp import local_part, local_tensor, shard_student  # noqa: E402
from sparsekd_deploy.core.mask_learning import MaskLearner, learning_start  # noqa: E402
from sparsekd_deploy.core.patterns import make_pattern  # noqa: E402
from sparsekd_deploy.core.pruner import Pruner, apply_masks  # noqa: E402

STEPS = 3


def _student(name: str):
    if name == "gpt2-36":  # Conv1D [in, out] with in = 36: 18 rows a rank cut the 2:4 groups of c_attn, c_fc, c_proj
        torch.manual_seed(0)
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=36, n_layer=2, n_head=4, n_positions=64, n_inner=72,
                                                vocab_size=VOCAB)).eval()
    if name == "llama-71":  # gate/up_proj: 71 rows, cut 36 + 35 (uneven); down_proj (71 inputs) is skipped by 2:4
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=71, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64, vocab_size=VOCAB)).eval()
    if name == "llama-kv4":  # k/v_proj: 4 rows (one KV head of 4), cut 2 + 2 + 0 over 3 ranks: rank 2 holds none
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=4, num_key_value_heads=1,
                                                  max_position_embeddings=64, vocab_size=VOCAB)).eval()
    return build_tiny(name)


# (name, model, pattern, earlier stage's fraction, this stage's fraction, grid). A grid: weights and updates rounded to
# multiples of it and masks ranked by |W| alone, so many groups' next-weakest scores tie where the partial stage's
# layer-wide choice cuts them (only the order of the global group index decides which groups are chosen there).
CASES = [("llama-full", "llama", "2:4", 0.7, 1.0, None), ("llama-partial", "llama", "2:4", 0.7, 0.9, None),
         ("llama-71-partial", "llama-71", "2:4", 0.7, 0.9, None), ("gpt2-partial", "gpt2", "2:4", 0.7, 0.9, None),
         ("gpt2-36-partial", "gpt2-36", "2:4", 0.7, 0.9, None),
         ("llama-ties", "llama", "2:4", 0.5, 0.8, 1 / 16), ("gpt2-ties", "gpt2", "2:4", 0.5, 0.8, 1 / 16),
         ("llama-unstructured", "llama", "unstructured:0.5", 0.5, 1.0, None),
         # run on 3 ranks only (``main``'s names): a rank whose shard of a layer has no rows, in a partial stage
         ("kv4-partial", "llama-kv4", "2:4", 0.7, 0.9, None)]
THREE_RANKS = {"kv4-partial"}


def _magnitude(pruner: Pruner) -> dict[str, torch.Tensor]:
    from sparsekd_deploy.core.fsdp import gathered

    return {ly.name: (gathered(ly.module.weight).t() if ly.transposed else gathered(ly.module.weight)).detach().abs()
            for ly in pruner.layers}


def _learner(team: Team | None, model, pattern: str, earlier: float, fraction: float, grid: float | None
             ) -> MaskLearner:
    pruner = Pruner(model, make_pattern(pattern))
    dense = learning_start(model, pruner)
    scores = _magnitude(pruner)
    frozen = pruner.stage_masks(scores, earlier)
    for ly in pruner.layers:
        scores[ly.name][~(frozen[ly.param_name].t() if ly.transposed else frozen[ly.param_name])] = float("-inf")
    masks = pruner.stage_masks(scores, fraction)
    apply_masks(model, masks)
    gen = torch.Generator().manual_seed(7)
    norms = None if grid else {ly.name: torch.rand(ly.shape_oi[1], generator=gen) + 0.5 for ly in pruner.layers}
    learner = MaskLearner(model, pruner, masks, fraction, norms, frozen=frozen, decay=0.0 if grid else 10.0, team=team)
    learner.start(dense)
    return learner


def _steps(learner: MaskLearner, params: dict[str, torch.Tensor], grid: float | None) -> None:
    for step in range(STEPS):
        learner.before_step()
        gen = torch.Generator().manual_seed(100 + step)
        with torch.no_grad():
            for name in sorted(learner.masks):
                p = params[name]
                noise = torch.randn(p.shape, generator=gen) * 0.1  # the whole update, drawn alike on every rank
                if grid:
                    noise = (noise / grid).round() * grid
                local_tensor(p).add_(local_part(p, noise))
        learner.after_step(lr=1e-3)


def case(team: Team, counts: dict, model_name: str, pattern: str, earlier: float, fraction: float,
         grid: float | None) -> dict:
    student = _student(model_name)
    if grid:
        with torch.no_grad():
            for p in student.parameters():
                p.copy_((p / grid).round() * grid)
    reference = copy.deepcopy(student)
    root = LossModule(student, lambda ids, rows: student(input_ids=ids).logits.sum())
    shard_student(root, student, torch.device("cpu"), team.world)
    sharded = _learner(team, student, pattern, earlier, fraction, grid)
    counts.update(latents=0, scores=0)
    _steps(sharded, dict(student.named_parameters(remove_duplicate=False)), grid)
    out = dict(counts)
    masks = sharded.finish()
    single = _learner(None, reference, pattern, earlier, fraction, grid)
    _steps(single, dict(reference.named_parameters(remove_duplicate=False)), grid)
    ref = single.finish()
    out["masks_equal"] = sorted(masks) == sorted(ref) and all(torch.equal(masks[k], ref[k]) for k in ref)
    out["flips"] = [sharded.flips, single.flips]
    out["layers"] = len(ref)
    return out


def main(out: Path, names: list[str]) -> None:
    """``names``: the cases to run (default all but THREE_RANKS's)."""
    team = Team.launched()
    counts = {"latents": 0, "scores": 0}
    latents, scores = mask_learning.gathered_like, fsdp_nm.gathered_rows

    def counted_latents(*args, **kwargs):
        counts["latents"] += 1
        return latents(*args, **kwargs)

    def counted_scores(*args, **kwargs):
        counts["scores"] += 1
        return scores(*args, **kwargs)

    # after_step's gathers only: finish() gathers the masks (once a phase) through the same function
    mask_learning.gathered_like, fsdp_nm.gathered_rows = counted_latents, counted_scores
    names = names or [name for name, *_ in CASES if name not in THREE_RANKS]
    results = {name: case(team, counts, *spec) for name, *spec in CASES if name in names}
    (out / f"rank{team.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
