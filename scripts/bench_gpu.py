"""Issue #4 bars on a GPU, side by side in one run (same runtime, same process):

1. 2:4 student vs dense teacher prefill latency at a shape where the hardware can pay
   (hidden ≥ 2048, batch × sequence ≥ 4096, FP16), torch target (cuSPARSELt/CUTLASS 2:4 kernels);
2. the per-layer profile's predicted end-to-end gain vs the measured one (bar: within 15 %).

The model is a Llama of the demo's shape family scaled to hidden 2048, random weights pruned to 2:4 by
magnitude: latency does not depend on what the weights learned.

    python scripts/bench_gpu.py [--layers 4] [--seq 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
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
    dense = LlamaForCausalLM(cfg).half().cuda().eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")
    with tempfile.TemporaryDirectory() as tmp:
        student = LlamaForCausalLM(cfg).half().eval()
        student.load_state_dict(dense.state_dict())
        pruner = Pruner(student, NM(2, 4))
        masks = pruner.stage_masks({ly.name: ly.weight_oi().detach().float().abs() for ly in pruner.layers}, 1.0)
        apply_masks(student, masks)
        student.save_pretrained(tmp)
        student = student.cuda()
        swapped = to_semi_structured(student)
        shapes = {ly.name: ly.shape_oi for ly in pruner.layers}
        with torch.no_grad():
            t_dense = _cuda_ms(lambda: dense(input_ids=ids, use_cache=False), 10)
            t_sparse = _cuda_ms(lambda: student(input_ids=ids, use_cache=False), 10)
            t_dense2 = _cuda_ms(lambda: dense(input_ids=ids, use_cache=False), 10)  # A/B/A against drift
        layers = time_layers_torch(shapes, args.batch * args.seq)
    t_dense = (t_dense + t_dense2) / 2
    pred = predict(layers, t_dense)
    measured = t_dense / t_sparse
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.batch * args.seq,
           "hidden": args.hidden, "dense_prefill_ms": t_dense, "sparse_prefill_ms": t_sparse,
           "measured_speedup": measured, "predicted_speedup": pred["predicted_speedup"],
           "prediction_error": abs(pred["predicted_speedup"] - measured) / measured,
           "sparse_layers": sum(v == "sparse" for v in swapped.values()), "layers": len(swapped)}
    print(f"{res['device']}: prefill {args.batch}x{args.seq} FP16, hidden {args.hidden}")
    print(f"  dense teacher {t_dense:.2f} ms, 2:4 student {t_sparse:.2f} ms → {measured:.2f}x (bar ≥ 1.3)")
    print(f"  per-layer profile predicts {pred['predicted_speedup']:.2f}x; error {res['prediction_error']:.1%} (bar ≤ 15 %)")
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
