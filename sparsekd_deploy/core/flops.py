"""Model-FLOPs utilisation (MFU) of a distillation's training steps on a GPU.

MFU = the FLOPs the model's arithmetic needs per second of training / the device's dense peak (PaLM, Chowdhery et al.
2022, appendix B): per trained token the student's forward and backward take 6·N + 12·L·d·T FLOPs, the teacher's
forward 2·N_t + 4·L_t·d_t·T (N: parameters in matrix multiplies, the output head included, embeddings' lookups not;
L layers, d the attention width, T the sequence length). The teacher's forward counts because a KD step cannot skip it;
with a top-K cache or a text teacher the step has no teacher pass, and none is counted. A 2:4 student still runs dense
matrix multiplies during training, so its N is the dense count. Recomputation and the optimizer are not model FLOPs:
they lower MFU, as they should.

The peak is the dense 16-bit tensor-core figure of NVIDIA's datasheets (no structured-sparsity doubling); a device not
in the table has none unless ``SPARSEKD_PEAK_TFLOPS`` gives it, and then the record says why MFU is missing.
"""

from __future__ import annotations

import os

import torch

PEAK_ENV = "SPARSEKD_PEAK_TFLOPS"

# Dense BF16/FP16 tensor-core TFLOP/s with fp32 accumulation (datasheets), matched against torch.cuda.get_device_name() in this order:
# the first key that is a substring of the name wins, so more specific names come first.
PEAK_16BIT_TFLOPS = {
    "GH200": 989.4, "H200 NVL": 835.0, "H200": 989.4,
    "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
    "B200": 2250.0, "B100": 1750.0,
    "A100": 312.0, "A800": 312.0, "A30": 165.0, "A10G": 70.0, "A10": 125.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "RTX 4090": 165.2, "RTX 3090": 35.6, "V100": 125.0, "T4": 65.0,
}


def peak_flops(device_name: str) -> tuple[float | None, str]:
    """(dense 16-bit peak in FLOP/s, where it came from) for a CUDA device name; (None, why) when unknown."""
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            return None, f"{PEAK_ENV}={override!r} is not a number of TFLOP/s"
        if value > 0:
            return value * 1e12, f"{PEAK_ENV}"
        return None, f"{PEAK_ENV}={override!r} is not a positive number of TFLOP/s"
    for key, tflops in PEAK_16BIT_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12, f"datasheet peak of {key}"
    return None, f"no peak known for {device_name!r}: set {PEAK_ENV} to its dense bf16 TFLOP/s"


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights that enter a matrix multiply each forward: nn.Linear and GPT-2's Conv1D (the output head included,
    also when it shares its weight with the embeddings, whose lookup is no multiply)."""
    from transformers.pytorch_utils import Conv1D

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear | Conv1D))


def _layers_and_width(config) -> tuple[int, int]:
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return int(layers), int(heads * head_dim)


def forward_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """FLOPs of one forward pass per token at sequence length ``seq_len``: 2·N + 4·L·d·T (QKᵀ and AV, causal
    masking not subtracted, as PaLM counts)."""
    layers, width = _layers_and_width(model.config)
    return 2.0 * matmul_parameters(model) + 4.0 * layers * width * seq_len


def kd_step_flops_per_token(student: torch.nn.Module, teacher: torch.nn.Module | None, seq_len: int) -> float:
    """Model FLOPs per trained token of a KD step: the student's forward + backward (3× its forward) and, when the
    step runs one, the teacher's forward."""
    flops = 3.0 * forward_flops_per_token(student, seq_len)
    if teacher is not None:
        flops += forward_flops_per_token(teacher, seq_len)
    return flops


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None) -> float | None:
    if not peak or tokens_per_second <= 0:
        return None
    return flops_per_token * tokens_per_second / peak


class Utilisation:
    """A run's MFU bookkeeping on CUDA: FLOPs per trained token and the peak of all its GPUs together."""

    def __init__(self, flops_per_token: float, peak: float | None, source: str):
        self.flops_per_token, self.peak, self.source = flops_per_token, peak, source

    @classmethod
    def for_run(cls, device: torch.device, student: torch.nn.Module, teacher_in_step: torch.nn.Module | None,
                seq_len: int, world: int, mixed_precision: str = "bf16") -> Utilisation | None:
        """None off CUDA: a CPU has no tensor-core peak to measure against. ``mixed_precision``: the accelerator's
        (no / bf16 / fp16); an fp32 run never uses the 16-bit peak, so its MFU is left out and the record says why."""
        if device.type != "cuda":
            return None
        if mixed_precision not in ("bf16", "fp16"):
            peak, source = None, "fp32 training: the peaks known here are 16-bit tensor-core peaks"
        else:
            peak, source = peak_flops(torch.cuda.get_device_name(device))
        return cls(kd_step_flops_per_token(student, teacher_in_step, seq_len), peak * world if peak else None, source)

    def record(self, tokens_per_second: float) -> dict:
        """The stage record's entries: ``mfu`` (None with ``mfu_peak`` saying why when the peak is unknown)."""
        value = mfu(self.flops_per_token, tokens_per_second, self.peak)
        return {"mfu": round(value, 4) if value is not None else None,
                "model_tflops_per_second": round(self.flops_per_token * tokens_per_second / 1e12, 2),
                "mfu_peak": self.source}
