"""``sparsekd-deploy distill``: staged SparseKD from flags and/or a YAML recipe."""

from __future__ import annotations

import sys

import click

from ..console import RichReporter, print_error, stdout_json
from .error_handling import handle_errors

# (flag, config field, click kwargs). `build` reuses the same list so it accepts every distill flag.
DISTILL_OPTIONS = [
    ("--teacher", "teacher", dict(help="Local HF model dir (safetensors) or cached Hub id; default: the demo teacher.")),
    ("--pattern", "pattern", dict(help="2:4 (any n:m), unstructured:S or channels:S; unstructured:auto / channels:auto "
                                       "prune until the next stage would break --kl-budget. [default: 2:4]")),
    ("--stages", "stages", dict(type=int, help="Stages from dense to the target. [default: 1 for n:m and for targets "
                                                    "≤ 0.5, else 3]")),
    ("--kl-budget", "kl_budget", dict(type=float, help="Accept a stage only if held-out KL ≤ this. [default: 0.15]")),
    ("--steps-per-stage", "steps_per_stage", dict(type=int, help="Distillation steps per stage. [default: 300 ÷ "
                                                                     "stages]")),
    ("--step-schedule", "step_schedule", dict(type=click.Choice(["equal", "backloaded"]),
                                              help="Split of the step budget over stages. [default: backloaded]")),
    ("--sparsity-schedule", "sparsity_schedule", dict(type=click.Choice(["linear", "cubic"]),
                                                      help="How sparsity grows over stages. [default: cubic]")),
    ("--retries", "retries", dict(type=int, help="Extra attempts (each longer) for a stage over budget. [default: 2]")),
    ("--importance", "importance", dict(help="magnitude | wanda | taylor | fisher (channels only: Fisher of a gate on "
                                             "each MLP channel). [default: fisher for channels:S, else wanda]")),
    ("--compensation", "compensation", dict(type=click.Choice(["off", "ls"]),
                                            help="channels: ls refits each MLP's output projection on the kept "
                                                 "channels after a prune. [default: ls for channels:S]")),
    ("--operator", "operator", dict(help="Softening operator: power:T, mix:λ, topk:K. [default: power:1]")),
    ("--loss", "loss", dict(help="forward-kl | reverse-kl | js | mixed:α. [default: forward-kl]")),
    ("--teacher-access", "teacher_access", dict(help="logits (teacher distributions, teacher in memory), text (teacher "
                                                     "samples as targets) or topk:K (the teacher's top-K log-probs + tail "
                                                     "mass cached on disk once, then training without the teacher; the "
                                                     "operator becomes topk:K). [default: logits]")),
    ("--teacher-cache", "teacher_cache", dict(help="topk:K: the cache dir, kept and reused by runs with the same teacher, "
                                                   "tokenizer and data (another one is refused by its stamp). "
                                                   "[default: inside the run, removed at its end]")),
    ("--kd-chunk", "kd_chunk", dict(type=int, help="Compute the KD loss over the vocabulary in chunks of this many "
                                                   "tokens (full logits never in memory at once); 0 = off. [default: "
                                                   "auto: chunk when a batch's logits would pass 256 MiB]")),
    ("--tokenizer", "tokenizer", dict(help="Dir of the teacher's tokenizer when the teacher dir has none "
                                           "(needed with --data).")),
    ("--data", "data", dict(help="Text file or dir of *.txt; default: data-free (sample the teacher).")),
    ("--seq-len", "seq_len", dict(type=int, help="Tokens per training sequence. [default: 128]")),
    ("--num-samples", "num_samples", dict(type=int, help="Data-free: teacher samples to distill on. [default: 256]")),
    ("--batch-size", "batch_size", dict(type=int, help="[default: 8]")),
    ("--lr", "lr", dict(type=float, help="[default: 5e-4]")),
    ("--lr-search", "lr_search", dict(type=click.Choice(["auto", "on", "off"]),
                                      help="on: a short range test on the first stage's student picks the lr, "
                                           "starting from --lr; auto: on for step budgets ≥ 60. [default: auto]")),
    ("--seed", "seed", dict(type=int, help="[default: 0]")),
    ("--include", "include", dict(multiple=True, help="Glob of layers to prune (repeatable). [default: *]")),
    ("--exclude", "exclude", dict(multiple=True, help="Glob of layers to keep dense (repeatable); default: embeddings, lm_head.")),
    ("--allocation", "allocation", dict(type=click.Choice(["uniform", "loadpath"]),
                                        help="unstructured: one sparsity for every layer, or per layer by load path "
                                             "(less where pruning one layer alone costs the most KL). [default: "
                                             "loadpath for unstructured:S, else uniform]")),
    ("--dense-layers", "dense_layers", dict(help="n:m: keep the K most load-bearing layers dense, or auto.")),
    ("--mask-learning", "mask_learning", dict(type=click.Choice(["off", "sr-ste"]),
                                              help="sr-ste: each stage first chooses its masks through the KD loss "
                                                   "(straight-through, re-ranked every step), then recovers. [default: off]")),
    ("--mask-learning-share", "mask_learning_share",
     dict(type=float, help="With --mask-learning sr-ste: share of a stage's steps spent learning its masks. "
                            "[default: 0.5]")),
    ("--demolition", "demolition", dict(type=click.Choice(["off", "gradual"]),
                                        help="gradual: what a stage removes fades out over its first steps while "
                                             "the rest trains, then recovery under the masks. [default: off]")),
    ("--demolition-share", "demolition_share",
     dict(type=float, help="With --demolition gradual: share of a stage's steps over which its removal fades. "
                            "[default: 0.5]")),
    ("--loadpaths", "loadpaths", dict(help="loadpaths.json from `sparsekd-deploy analyze` (default: analysed in the run).")),
    ("--sparsify-only-faster", "sparsify_only_faster",
     dict(help="profile.json from `sparsekd-deploy profile`: keep dense the layers where 2:4 is not faster.")),
    ("--precision", "precision", dict(type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                                      help="Autocast on GPU; CPU runs fp32. [default: auto]")),
    ("--teacher-precision", "teacher_precision",
     dict(type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
          help="The teacher's weights while the student trains: auto = the run's 16-bit autocast type on a GPU "
               "(half the memory; its matmuls run in it anyway), fp32 on a CPU. Data, baselines and load paths "
               "use the fp32 teacher. [default: auto]")),
    ("--fsdp", "fsdp", dict(is_flag=True, help="Under torchrun / accelerate launch (N ≥ 2 processes): shard the "
                                               "student over the processes (FSDP2; GPUs or CPUs) instead of DDP's "
                                               "whole copy per process (every pattern and option: taylor, "
                                               "sr-ste, gradual demolition and QAT included).")),
    ("--consistency-temperature", "consistency_temperatures",
     dict(type=float, multiple=True, help="Temperature(s) for repeat-prompt consistency. [default: 1.0]")),
]


def distill_options(fn):
    for flag, dest, kwargs in reversed(DISTILL_OPTIONS):
        fn = click.option(flag, dest, default=None, **kwargs)(fn)
    fn = click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe; flags override it.")(fn)
    fn = click.option("--resume", is_flag=True, help="Continue an interrupted run from its last accepted stage.")(fn)
    fn = click.option("--overwrite", is_flag=True, help="Replace an existing output dir (only once the run succeeds).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout (progress stays on stderr).")(fn)
    return fn


def config_from_flags(recipe, out, flags: dict, require_out: bool = True, extra: dict | None = None):
    """The run's config: recipe, then flags; ``extra``: overrides of fields outside DISTILL_OPTIONS (build's
    quantization flags), checked with the rest."""
    from ..config import build_config

    overrides = {dest: flags.get(dest) for _, dest, _ in DISTILL_OPTIONS} | (extra or {})
    for dest in ("include", "exclude", "consistency_temperatures"):
        overrides[dest] = list(overrides[dest]) if overrides[dest] else None  # click gives () when absent
    overrides["out"] = out
    cfg = build_config(recipe, overrides)
    if require_out and cfg.out is None:
        from ..errors import ConfigError

        raise ConfigError(["--out is required (or `out:` in the recipe)"])
    return cfg


@click.command("distill")
@click.option("--out", help="Run directory: student/, sparsity.json, trajectory.json/png.")
@distill_options
@handle_errors(resumable=True)
def distill_cmd(out, recipe, resume, overwrite, as_json, **flags):
    """Staged sparse knowledge distillation of a teacher into a sparse student.

    Exit code: 0 target reached, 1 stopped early (the last accepted stage is saved), 2 bad input.
    """
    from ..core.distill import distill

    cfg = config_from_flags(recipe, out, flags)
    reporter = RichReporter(quiet=False)
    result = distill(cfg, resume=resume, overwrite=overwrite, reporter=reporter)
    if as_json:
        stdout_json(result.summary)
    else:
        reporter.console.print(
            f"student → [bold]{result.summary['student']}[/bold]  sparsity {result.summary['sparsity']:.1%}  "
            f"KL {result.summary['kl']:.4f}  top-1 {result.summary['top1']:.3f}"
        )
    from ..core.distributed import leave_together

    leave_together()  # under a launcher: no rank exits while the main process still writes or prints
    if not result.reached_target:
        kept = result.summary["final_stage"]
        where = (f"kept stage {kept} of {result.summary['stages']}" if kept
                 else "no stage was accepted, so the saved student is the dense teacher")
        print_error(f"target not reached: {result.reason}; {where}")
        sys.exit(1)
