"""Teacher references, recorded at build time so a device that cannot run the teacher can still validate.

Stored in the bundle under ``references/``:
- ``references.safetensors``: prompts (token ids), the teacher's top-k log-probs + tail log-mass per position,
  its NLL of each next token, and its greedy continuations;
- ``references.json``: k, lengths, temperature, seeds, and the teacher's repeat-prompt consistency statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..errors import SparseKDError

if TYPE_CHECKING:
    import torch

TENSORS = "references/references.safetensors"
META = "references/references.json"


class ReferenceError(SparseKDError):
    pass


@dataclass
class RefSettings:
    # Reference prompts for KL / top-1 / ppl / greedy match and the confidence measurement: as many as the stability
    # prompts, so that every stability interval resamples the same number of prompts (8 under-covered badly).
    prompts: int = 16
    length: int = 64  # tokens per prompt scored for KL / top-1 / ppl
    prefix: int = 16  # prompt prefix for generation (greedy + consistency)
    top_k: int = 32
    greedy_tokens: int = 16
    samples: int = 16
    sample_tokens: int = 16
    # τ=0.7, m=2: at τ=1 a small teacher's first 4 tokens almost never repeat, which measures nothing.
    temperature: float = 0.7
    m: int = 2
    # Stability references (validate/stability_record.py): the teacher's samples of the first `stability_prompts`
    # prefixes, `stability_samples` per prompt (the most `validate --samples` can compare against), and the
    # prompt edits for sensitivity.
    stability_prompts: int = 16
    stability_samples: int = 256


def record(teacher, heldout: torch.Tensor, out_dir: Path, s: RefSettings | None = None, tokenizer=None) -> dict:
    """Run the teacher on held-out prompts and write the references into ``out_dir/references``. Without a
    ``tokenizer`` the sensitivity references are skipped (the prompt edits are made on text) and say so."""
    import torch  # the build host's job: loading references (on the device) needs no torch

    with torch.no_grad():
        return _record(teacher, heldout, out_dir, s or RefSettings(), tokenizer)


def _record(teacher, heldout: torch.Tensor, out_dir: Path, s: RefSettings, tokenizer=None) -> dict:
    import torch

    from ..core.sampling import sample
    from ..numerics import log_softmax_torch, topk_bucket_torch

    teacher.eval()
    ids = heldout[: s.prompts, : s.length].clone()
    if len(ids) == 0:
        raise ReferenceError("no held-out sequences to record teacher references from")
    logp = log_softmax_torch(teacher(input_ids=ids).logits.float())
    # The same buckets (tail clamp, floor) as the topk training operator and the kl_topk metric.
    topk_idx, buckets = topk_bucket_torch(logp, s.top_k)
    topk_logp, tail = buckets[..., :-1].contiguous(), buckets[..., -1].contiguous()
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    prefix = ids[:, : s.prefix]
    greedy, _ = sample(teacher, prefix, s.greedy_tokens, temperature=0.0)
    seeds = list(range(s.samples))
    from .stability_record import record_stability

    # The teacher's consistency statistics (teacher_consistency in the meta) come with its stability references.
    stab_tensors, stab_meta = record_stability(teacher, heldout, s, tokenizer, topk_logp[..., 0].numpy())
    ref_dir = out_dir / "references"
    ref_dir.mkdir(parents=True, exist_ok=True)
    save_file({
        "input_ids": ids.numpy(), "topk_idx": topk_idx.numpy().astype(np.int64),
        "topk_logp": topk_logp.numpy(), "tail_logp": tail.numpy(), "nll": nll.numpy(),
        "greedy": greedy.numpy().astype(np.int64), **stab_tensors,
    }, str(out_dir / TENSORS))
    meta = {**s.__dict__, "seeds": seeds, **stab_meta,
            "teacher_ppl": float(torch.exp(nll.mean())), "teacher_top1_self": 1.0}
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# What validation reads from the references (written by ``record`` above).
REQUIRED_TENSORS = ("input_ids", "topk_idx", "topk_logp", "tail_logp", "nll", "greedy")
REQUIRED_META = {"prefix": int, "greedy_tokens": int, "samples": int, "sample_tokens": int, "temperature": (int, float),
                 "m": int, "seeds": list, "teacher_consistency": dict}


@dataclass
class References:
    tensors: dict[str, np.ndarray]
    meta: dict

    @classmethod
    def load(cls, bundle) -> References:
        if not (bundle.has(TENSORS) and bundle.has(META)):
            raise ReferenceError(f"bundle {bundle.path} has no teacher references ({TENSORS}); rebuild it with `build`")
        from ..bundle import BundleError

        try:
            tensors = load_file(str(bundle.file(TENSORS)))
        except SafetensorError as e:
            raise BundleError(f"bundle {bundle.path}: {TENSORS} is not a readable safetensors file ({e}); "
                              "rebuild the bundle with `build`") from None
        try:
            meta = json.loads(bundle.file(META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"bundle {bundle.path}: {META} is not valid JSON ({e}); rebuild the bundle with `build`"
                              ) from None
        if not isinstance(meta, dict):
            raise BundleError(f"bundle {bundle.path}: {META} is not a JSON object; rebuild the bundle with `build`")
        missing = [f"tensor {k}" for k in REQUIRED_TENSORS if k not in tensors]
        missing += [f"key {k}" for k, kind in REQUIRED_META.items() if not isinstance(meta.get(k), kind)
                    or isinstance(meta.get(k), bool)]
        if missing:
            raise BundleError(f"bundle {bundle.path}: the teacher references lack or mistype {', '.join(missing)}; "
                              "rebuild the bundle with `build`")
        return cls(tensors, meta)
