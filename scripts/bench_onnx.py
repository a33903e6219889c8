"""Issue #3 bars, side by side in one run: ONNX parity, sparsity audit, and KV-cache decoding speed.

Decoding (greedy, tokens/s) of the same student with
  (a) sparsekd-deploy's onnxruntime target,
  (b) optimum's ORTModelForCausalLM on the *same* ONNX file,
  (c) PyTorch eager ``generate``,
alternated over several rounds (machines are noisy), medians reported with ratios.

    .venv/bin/python scripts/bench_onnx.py [--student dist/demo.run/student] [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparsekd_deploy.core.patterns import make_pattern
from sparsekd_deploy.exporters.audit import audit_onnx, pruned_weights
from sparsekd_deploy.exporters.onnx import export_onnx
from sparsekd_deploy.models.loading import load_model
from sparsekd_deploy.pipeline.parity import check_parity
from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget


def timed(fn, n_tokens: int) -> float:
    start = time.perf_counter()
    fn()
    return n_tokens / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, default=Path("dist/demo.run/student"),
                    help="a distilled student dir (default: the one `make demo` leaves)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not (args.student / "config.json").is_file():
        ap.error(f"{args.student} is not a student dir (no config.json): run `make demo` first, or pass --student")
    torch.set_num_threads(2)
    run_dir = args.student.parent
    model = load_model(args.student)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_path = tmp / "model.onnx"
        info = export_onnx(args.student, onnx_path)
        data_file = run_dir / "data.safetensors"
        if data_file.exists():
            from safetensors.torch import load_file

            prompts = load_file(str(data_file))["heldout"][:8, :64]
        else:
            prompts = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
        results["parity_fp32"] = check_parity(model, onnx_path, prompts)
        sp_file = run_dir / "sparsity.json"
        if sp_file.exists():
            sp = json.loads(sp_file.read_text())
            pat = make_pattern(sp["pattern"])
            if hasattr(pat, "m") and sp["layers"]:
                res = audit_onnx(onnx_path, pruned_weights(args.student, sp), pat.n, pat.m)
                results["audit"] = {"checked": len(res), "holding": sum(r.holds for r in res)}

        # optimum needs a model dir around the same file.
        for f in ("config.json", "generation_config.json"):
            if (args.student / f).exists():
                shutil.copy2(args.student / f, tmp / f)
        from optimum.onnxruntime import ORTModelForCausalLM

        ort_opt = ORTModelForCausalLM.from_pretrained(tmp, use_cache=True, use_io_binding=False)
        ours = OnnxRuntimeTarget(onnx_path)
        ids = prompts[: args.batch, : args.prompt_len]
        n = args.tokens * args.batch
        mask = torch.ones_like(ids)
        gen_kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                      pad_token_id=model.config.eos_token_id)

        def run_ours():
            return ours.generate(ids.numpy(), args.tokens).tokens

        def run_optimum():
            return ort_opt.generate(input_ids=ids, attention_mask=mask, **gen_kw)

        @torch.no_grad()
        def run_torch():
            return model.generate(input_ids=ids, attention_mask=mask, **gen_kw)

        # Same greedy text from all three (sanity: they decode the same model).
        a, b, c = run_ours(), run_optimum()[:, ids.shape[1]:].numpy(), run_torch()[:, ids.shape[1]:].numpy()
        results["greedy_identical"] = bool(np.array_equal(a, b) and np.array_equal(a, c))
        speeds = {"ours": [], "optimum": [], "torch": []}
        for _ in range(args.rounds):
            speeds["ours"].append(timed(run_ours, n))
            speeds["optimum"].append(timed(run_optimum, n))
            speeds["torch"].append(timed(run_torch, n))
        med = {k: statistics.median(v) for k, v in speeds.items()}
        results["decode_tokens_per_s"] = {k: round(v, 1) for k, v in med.items()}
        results["ratio_vs_optimum"] = round(med["ours"] / med["optimum"], 3)
        results["ratio_vs_torch"] = round(med["ours"] / med["torch"], 3)
    results["export"] = info.to_dict()
    p = results["parity_fp32"]
    print(f"parity fp32: max |Δlogit| {p['max_abs_logit_diff']:.2e} (bar ≤ 1e-4), KL {p['kl']:.2e} (bar ≤ 1e-6)")
    if "audit" in results:
        print(f"sparsity audit: {results['audit']['holding']}/{results['audit']['checked']} pruned initializers keep the pattern")
    d = results["decode_tokens_per_s"]
    print(f"greedy decode, batch {args.batch}, prompt {args.prompt_len}, {args.tokens} new tokens, median of {args.rounds}:")
    print(f"  sparsekd-deploy onnxruntime target {d['ours']:8.1f} tok/s")
    print(f"  optimum ORTModelForCausalLM        {d['optimum']:8.1f} tok/s   ratio {results['ratio_vs_optimum']} (bar ≥ 1.0)")
    print(f"  PyTorch eager generate             {d['torch']:8.1f} tok/s   ratio {results['ratio_vs_torch']} (bar ≥ 2.0)")
    print(f"  identical greedy text: {results['greedy_identical']}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
