"""Architecture adapters: which layers can be pruned, in which layout, and how MLP channels group.

Any Hugging Face causal LM whose projections are ``nn.Linear`` or GPT-2's ``Conv1D`` works for weight
patterns. ``Conv1D`` stores its weight as [in, out] (transposed vs ``nn.Linear``'s [out, in]); everything
here hands out [out, in] views so patterns always act on the input-features axis.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

DEFAULT_EXCLUDE = ("lm_head", "*embed*", "*wte", "*wpe", "*embed_out")

# Per family: the MLP's input projections (their out-channels are the intermediate channels), its output
# projection (its in-channels are the same channels) and the config key holding the intermediate size.
MLP_LAYOUTS = {
    "llama": (("gate_proj", "up_proj"), "down_proj", "intermediate_size"),
    "qwen2": (("gate_proj", "up_proj"), "down_proj", "intermediate_size"),
    "qwen3": (("gate_proj", "up_proj"), "down_proj", "intermediate_size"),
    "mistral": (("gate_proj", "up_proj"), "down_proj", "intermediate_size"),
    "gemma": (("gate_proj", "up_proj"), "down_proj", "intermediate_size"),
    "gpt2": (("c_fc",), "c_proj", "n_inner"),
    "opt": (("fc1",), "fc2", "ffn_dim"),
    "gpt_neox": (("dense_h_to_4h",), "dense_4h_to_h", "intermediate_size"),
}


@dataclass
class PrunableLayer:
    name: str  # module name, e.g. model.layers.0.mlp.down_proj
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    def weight_oi(self) -> torch.Tensor:
        """The weight as [out, in] (a view; Conv1D's is transposed)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    def to_native(self, t_oi: torch.Tensor) -> torch.Tensor:
        """Convert an [out, in] tensor (mask, score) back to the weight's own layout."""
        return t_oi.t().contiguous() if self.transposed else t_oi

    @property
    def shape_oi(self) -> tuple[int, int]:
        o, i = self.weight_oi().shape
        return int(o), int(i)


def _matches(name: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], g) for g in globs)


def prunable_layers(model: nn.Module, include=("*",), exclude=DEFAULT_EXCLUDE) -> list[PrunableLayer]:
    """Every Linear/Conv1D matching ``include`` and not ``exclude`` (globs on the full or last name)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)) and _matches(name, include) and not _matches(name, exclude):
            out.append(PrunableLayer(name, mod))
    return out


def embedding_tied(model: nn.Module) -> dict[str, str]:
    """Linear/Conv1D layers whose weight *is* an ``nn.Embedding``'s (a tied lm_head, Gemma's and GPT-2's by
    default): layer name -> embedding name. The pruner leaves them dense (pruning one zeroes embedding rows the
    input lookup reads too), so the export audit does not take their zeros (a padding row) for a pruned pattern."""
    embeds = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {name: embeds[id(m.weight)] for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) in embeds}


@dataclass
class MLPBlock:
    """One MLP: input projections (rows = channels in [out, in]) and the output projection (columns = channels)."""

    name: str
    inputs: list[PrunableLayer]
    output: PrunableLayer

    @property
    def intermediate(self) -> int:
        return self.output.shape_oi[1]


def mlp_layout(model: nn.Module) -> tuple[tuple[str, ...], str, str]:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in MLP_LAYOUTS:
        from ..errors import PatternError

        raise PatternError(
            f"structured channel pruning does not know the MLP of model type {model_type!r}; "
            f"known: {', '.join(sorted(MLP_LAYOUTS))} (n:m and unstructured work on any model)"
        )
    return MLP_LAYOUTS[model_type]


def mlp_blocks(model: nn.Module) -> list[MLPBlock]:
    in_names, out_name, _ = mlp_layout(model)
    blocks = []
    for name, mod in model.named_modules():
        children = dict(mod.named_children())
        if out_name in children and all(n in children for n in in_names):
            prefix = f"{name}." if name else ""
            blocks.append(
                MLPBlock(
                    name,
                    [PrunableLayer(prefix + n, children[n]) for n in in_names],
                    PrunableLayer(prefix + out_name, children[out_name]),
                )
            )
    return blocks


def _select(layer: PrunableLayer, keep: torch.Tensor, channel_axis_oi: int) -> None:
    """Physically keep only ``keep`` channels of a layer along an [out, in] axis."""
    mod = layer.module
    idx = keep.nonzero().squeeze(1).to(mod.weight.device)
    native_axis = (1 - channel_axis_oi) if layer.transposed else channel_axis_oi
    mod.weight = nn.Parameter(mod.weight.data.index_select(native_axis, idx).contiguous())
    if channel_axis_oi == 0 and getattr(mod, "bias", None) is not None:
        mod.bias = nn.Parameter(mod.bias.data.index_select(0, idx).contiguous())
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    else:  # Conv1D keeps nf = out features
        mod.nf = mod.weight.shape[1]


def shrink_mlp(model: nn.Module, keeps: dict[str, torch.Tensor]) -> int:
    """Remove channels for good; every block must keep the same count so the config stays uniform."""
    _, _, config_key = mlp_layout(model)
    counts = {int(k.sum()) for k in keeps.values()}
    if len(counts) != 1:
        raise RuntimeError(f"blocks keep different channel counts {sorted(counts)}; the config could not describe it")
    for block in mlp_blocks(model):
        keep = keeps[block.name]
        for layer in block.inputs:
            _select(layer, keep, 0)
        _select(block.output, keep, 1)
    new_size = counts.pop()
    setattr(model.config, config_key, new_size)
    return new_size
