"""PyTorch target for CUDA GPUs without TensorRT: 2:4 Linear weights become semi-structured sparse tensors
(``torch.sparse.to_sparse_semi_structured``: cuSPARSELt / CUTLASS kernels), FP16 or BF16.

On a CPU it runs dense (``sparse=False``): the same Target interface, so the logic is tested everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.patterns import NM
from .base import TARGETS, Target, TargetError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def semi_structured_ok(weight: torch.Tensor) -> str | None:
    """Why a Linear weight cannot use the 2:4 kernels, or None if it can."""
    out_f, in_f = weight.shape
    if not NM(2, 4).holds(weight.detach()):
        return "not 2:4 along in_features"
    # cuSPARSELt/CUTLASS need tile-aligned shapes; smaller layers stay dense (they would not pay anyway).
    if out_f % 64 or in_f % 64:
        return f"shape {out_f}x{in_f} is not a multiple of 64"
    return None


BACKENDS = ("cusparselt", "cutlass")


class SemiStructuredLinear(nn.Module):
    """A Linear whose weight is a 2:4 semi-structured tensor. Its forward hands the kernels a 2-D contiguous input:
    ``F.linear`` on a strided 3-D input decomposes into ``expand`` + ``bmm``, which the sparse tensor refuses."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.in_features).contiguous(), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def semi_structured(weight: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``weight`` as torch's 2:4 tensor; ``backend``: cusparselt / cutlass, None = torch's choice (cuSPARSELt where
    it is built in)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend not in (None, *BACKENDS):
        raise TargetError(f"2:4 backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"  # read when the tensor is made, not later
    try:
        return to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced


def to_semi_structured(model: nn.Module, skip=("lm_head",), backend: str | None = None,
                       only: set[str] | None = None) -> dict[str, str]:
    """Swap every eligible Linear (of ``only``, when given) for a ``SemiStructuredLinear`` in place; returns
    {layer: 'sparse' | reason it stayed dense}."""
    report = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name.split(".")[-1] in skip:
            continue
        if only is not None and name not in only:
            report[name] = "kept dense: not chosen"
            continue
        reason = semi_structured_ok(mod.weight)
        if reason:
            report[name] = reason
            continue
        swapped = SemiStructuredLinear(semi_structured(mod.weight.detach(), backend), mod.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, swapped)
        report[name] = "sparse"
    return report


@TARGETS.register("torch")
class TorchTarget(Target):
    name = "torch"

    def __init__(self, model_path: str | Path, device: str = "cuda", dtype: str = "fp16", sparse: bool = True,
                 max_positions: int | None = None, dir_of_file: bool = False, provider: str | None = None, **_):
        from ..models.loading import load_model

        if dir_of_file:  # the bundle names student/config.json; the model is its directory
            model_path = Path(model_path).parent
        if provider in ("cpu", "cuda"):
            device = provider
            sparse = sparse and device == "cuda"
        if device == "cpu" and dtype == "fp16":
            dtype = "fp32"  # CPU half-precision matmuls are slow and partly unsupported

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TargetError("the torch target's 2:4 kernels need a CUDA GPU; on a CPU use device='cpu', sparse=False")
        if sparse and device == "cpu":
            raise TargetError("semi-structured (2:4) kernels exist only on CUDA GPUs; pass sparse=False on a CPU")
        if dtype not in DTYPES:
            raise TargetError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.notes: list[str] = []
        if sparse:
            from ..exporters.trt_compat import compute_capability, sparse_tensor_cores

            cc = compute_capability(device)
            if not sparse_tensor_cores(cc):
                # The 2:4 kernels do not exist below Ampere: run the same weights dense and say so.
                self.notes.append(f"compute capability {cc} has no 2:4 sparse tensor cores: running dense")
                sparse = False
        self.model = load_model(Path(model_path)).to(device=device, dtype=DTYPES[dtype]).eval()
        self.device = device
        self.layers = to_semi_structured(self.model) if sparse else {}
        cfg = self.model.config
        from ..models.loading import max_positions as positions_of

        self.max_positions = max_positions or positions_of(cfg)
        self.vocab_size = cfg.vocab_size
        self.dtype = dtype

    @classmethod
    def from_model(cls, model: nn.Module) -> TorchTarget:
        """A loaded PyTorch LM as a target, dense, on its own device and dtype: the build host measures the teacher's
        references through the same ``Target`` code (sampling, seeds) that measures the student on the device."""
        self = cls.__new__(cls)
        self.model, self.device = model.eval(), str(next(model.parameters()).device)
        self.layers, self.notes = {}, []
        self.dtype = {v: k for k, v in DTYPES.items()}.get(next(model.parameters()).dtype, "fp32")
        from ..models.loading import max_positions as positions_of

        self.max_positions, self.vocab_size = positions_of(model.config), model.config.vocab_size
        return self

    def _gather_past(self, past, rows):
        past.reorder_cache(torch.as_tensor(rows, device=self.device))  # in place: the unshared cache is not reused
        return past

    def describe(self) -> dict:
        return {"runtime": "torch", "version": torch.__version__, "provider": self.device, "dtype": self.dtype,
                "sparse_layers": sum(v == "sparse" for v in self.layers.values()), "notes": self.notes}

    @torch.no_grad()
    def _forward(self, ids: np.ndarray, past, past_len: int):
        out = self.model(input_ids=torch.from_numpy(ids).to(self.device), past_key_values=past, use_cache=True)
        return out.logits.float().cpu().numpy(), out.past_key_values
