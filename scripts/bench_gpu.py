"""Issue #4 bars on a GPU, side by side in one run (same runtime, same process):

1. 2:4 student vs dense teacher prefill latency at a shape where the hardware can pay
   (hidden ≥ 2048, batch × sequence ≥ 4096, FP16), torch target (cuSPARSELt/CUTLASS 2:4 kernels);
2. the per-layer profile's predicted end-to-end gain vs the measured one (bar: within 15 %).

Two students are timed: every eligible Linear on the 2:4 kernels ("all sparse"), and the one
`distill --sparsify-only-faster profile.json` would give — only the layers the per-layer profile found faster
("profile's choice"); the prediction is made for the second. The model is a Llama of the demo's shape family scaled
to hidden 2048, random weights pruned to 2:4 by magnitude: latency does not depend on what the weights learned.

    python scripts/bench_gpu.py [--layers 4] [--seq 4096] [--backend cusparselt|cutlass] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--backend", choices=["cusparselt", "cutlass"], help="2:4 kernels (default: torch's choice)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsekd_deploy.core.patterns import NM
    from sparsekd_deploy.core.pruner import Pruner, apply_masks
    from sparsekd_deploy.speedup import _cuda_ms, predict, time_layers_torch
    from sparsekd_deploy.targets.torch_cuda import to_semi_structured

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                      num_key_value_heads=args.hidden // 128, max_position_embeddings=max(4096, args.seq))
    with torch.device("cuda"):
        dense = LlamaForCausalLM(cfg).half().eval()
    pruned = copy.deepcopy(dense)
    pruner = Pruner(pruned, NM(2, 4))
    masks = pruner.stage_masks({ly.name: ly.weight_oi().detach().float().abs() for ly in pruner.layers}, 1.0)
    apply_masks(pruned, masks)
    shapes = {ly.name: ly.shape_oi for ly in pruner.layers}
    layers = time_layers_torch(shapes, args.batch * args.seq, backend=args.backend)
    faster = {name for name, v in layers.items() if v["speedup"] > 1.0}
    all_sparse, chosen = copy.deepcopy(pruned), pruned
    swapped = to_semi_structured(all_sparse, backend=args.backend)
    to_semi_structured(chosen, backend=args.backend, only=faster)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")
    with torch.no_grad():
        run = {name: (lambda m=m: m(input_ids=ids, use_cache=False))
               for name, m in (("dense", dense), ("all", all_sparse), ("chosen", chosen))}
        t = {name: [] for name in run}
        for _ in range(2):  # A/B/C/A/B/C against drift
            for name, fn in run.items():
                t[name].append(_cuda_ms(fn, 10))
    t = {name: sum(v) / len(v) for name, v in t.items()}
    pred = predict(layers, t["dense"])
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "backend": args.backend or "torch default",
           "tokens": args.batch * args.seq, "hidden": args.hidden, "dense_prefill_ms": t["dense"],
           "all_sparse_prefill_ms": t["all"], "all_sparse_speedup": t["dense"] / t["all"],
           "chosen_prefill_ms": t["chosen"], "measured_speedup": t["dense"] / t["chosen"],
           "predicted_speedup": pred["predicted_speedup"],
           "prediction_error": abs(pred["predicted_speedup"] - t["dense"] / t["chosen"]) / (t["dense"] / t["chosen"]),
           "layers_faster_sparse": len(faster), "layers": len(swapped),
           "per_shape": {f"{v['shape_out_in'][0]}x{v['shape_out_in'][1]}": {k: round(v[k], 4) for k in
                                                                             ("dense_ms", "sparse_ms", "speedup")}
                         for v in layers.values()}}
    print(f"{res['device']}: prefill {args.batch}x{args.seq} FP16, hidden {args.hidden}, 2:4 kernels: {res['backend']}")
    for shape, v in res["per_shape"].items():
        print(f"  layer {shape}: dense {v['dense_ms']:.3f} ms, 2:4 {v['sparse_ms']:.3f} ms → {v['speedup']:.2f}x")
    print(f"  dense teacher {t['dense']:.2f} ms; all layers 2:4 {t['all']:.2f} ms → {res['all_sparse_speedup']:.2f}x; "
          f"profile's choice ({len(faster)}/{len(swapped)} layers) {t['chosen']:.2f} ms → {res['measured_speedup']:.2f}x "
          "(bar ≥ 1.3)")
    print(f"  per-layer profile predicts {pred['predicted_speedup']:.2f}x; error {res['prediction_error']:.1%} (bar ≤ 15 %)")
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
