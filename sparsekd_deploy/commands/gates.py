"""Gate flags shared by ``build`` and ``validate``."""

from __future__ import annotations

import click

GATE_OPTIONS = [
    ("--max-kl", "max_kl", float, "Fail if kl_topk exceeds this. [default: 0.25]"),
    ("--min-top1", "min_top1", float, "Fail if top-1 agreement is below this. [default: 0.7]"),
    ("--min-greedy-match", "min_greedy_match", float, "Fail if fewer prompts match the teacher's greedy text. [default: 0.1]"),
    ("--max-ppl-ratio", "max_ppl_ratio", float, "Fail if student/teacher perplexity exceeds this. [default: 1.5]"),
    ("--min-consistency-ratio", "min_consistency_ratio", float,
     "Fail if teacher/student sampling entropy falls below this. [default: 0.8]"),
    # Stability gates: off unless given (the ratios are always reported); each counts only beside a passing kl_topk.
    ("--max-jitter-ratio", "max_jitter_ratio", float,
     "Fail if student/teacher repeat-prompt jitter (1 - pairwise agreement) exceeds this; counts only with kl_topk "
     "passing. [default: off]"),
    ("--max-sensitivity-ratio", "max_sensitivity_ratio", float,
     "Fail if student/teacher KL between a prompt's and its edited variants' next-token distributions exceeds this; "
     "counts only with kl_topk passing. [default: off]"),
    ("--max-low-confidence-ratio", "max_low_confidence_ratio", float,
     "Fail if student/teacher share of positions with top-1 probability < 0.3 exceeds this; counts only with "
     "kl_topk passing. [default: off]"),
]


def gate_options(fn):
    fn = click.option("--no-determinism-gate", "no_determinism_gate", is_flag=True,
                      help="Do not fail when a prompt's tokens change with the prompts batched beside it (an "
                           "int8-dynamic graph's activation ranges are per call): for runtimes that serve one prompt "
                           "per call. Still measured and reported.")(fn)
    for flag, dest, typ, help_ in reversed(GATE_OPTIONS):
        fn = click.option(flag, dest, type=typ, default=None, help=help_)(fn)
    return fn


def gates_from(kwargs: dict):
    from ..validate.gate import Gates

    g = Gates(**{dest: kwargs.pop(dest) for _, dest, _, _ in GATE_OPTIONS if kwargs.get(dest) is not None})
    for _, dest, _, _ in GATE_OPTIONS:
        kwargs.pop(dest, None)
    g.require_determinism = not kwargs.pop("no_determinism_gate", False)
    g.check_ranges()
    return g
