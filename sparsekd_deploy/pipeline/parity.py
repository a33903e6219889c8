"""Parity between PyTorch and the exported graph on real prompts (not only dummy inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import SparseKDError
from ..numerics import kl as kl_per_position
from ..numerics import log_softmax

# (max |Δlogit|, mean KL) allowed per precision. FP16 weights move logits by ~1e-2 on small models. A quantized graph
# is judged against the teacher by validation; parity only catches a broken one (demo student, measured KL to PyTorch:
# int8-dynamic 0.002, int4-weight 0.012, int8 static 0.018, ORT's fp8 0.46).
QUANTIZED = (1e6, 1.0)
TOLERANCES = {"fp32": (1e-3, 1e-5), "fp16": (0.25, 5e-3), "int8-dynamic": QUANTIZED, "int8": QUANTIZED,
              "int4-weight": QUANTIZED, "fp8": QUANTIZED}


class ParityError(SparseKDError):
    exit_code = 1

    def __init__(self, precision: str, max_diff: float, kl: float, tol: tuple[float, float]):
        self.max_diff, self.kl = max_diff, kl
        super().__init__(f"{precision} ONNX graph disagrees with PyTorch: max |Δlogit| {max_diff:.3g} "
                         f"(allowed {tol[0]:g}), KL {kl:.3g} (allowed {tol[1]:g})")


@torch.no_grad()
def check_parity(model, onnx_path: str | Path, prompts: torch.Tensor, precision: str = "fp32",
                 tolerance: tuple[float, float] | None = None) -> dict:
    from ..targets.onnxruntime import OnnxRuntimeTarget

    tol = tolerance or TOLERANCES[precision]
    model.eval()
    ref = model(input_ids=prompts).logits.float().numpy()
    got = OnnxRuntimeTarget(onnx_path).logits(prompts.numpy())
    max_diff = float(np.abs(ref - got).max())
    kl = float(kl_per_position(log_softmax(ref), log_softmax(got)).mean())  # float64, as before
    result = {"precision": precision, "prompts": list(prompts.shape), "max_abs_logit_diff": max_diff, "kl": kl,
              "tolerance": {"max_abs_logit_diff": tol[0], "kl": tol[1]}}
    if not (max_diff <= tol[0] and kl <= tol[1]):
        raise ParityError(precision, max_diff, kl, tol)
    return result
