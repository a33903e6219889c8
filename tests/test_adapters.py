import pytest
import torch
from conftest import FAMILIES, build_tiny
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from sparsekd_deploy.core.patterns import NM, Channels
from sparsekd_deploy.core.pruner import Pruner, apply_masks
from sparsekd_deploy.models.adapters import mlp_blocks, prunable_layers, shrink_mlp


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_exclude_embeddings_and_head(family):
    model = build_tiny(family)
    names = [layer.name for layer in prunable_layers(model)]
    assert names and not any("lm_head" in n or "embed" in n for n in names)
    assert any("lm_head" in layer.name for layer in prunable_layers(model, exclude=()))
    only_mlp = prunable_layers(model, include=("*mlp*", "*fc*"))
    assert 0 < len(only_mlp) < len(names)


def test_conv1d_pattern_lies_on_input_features():
    model = build_tiny("gpt2")
    layer = next(lyr for lyr in prunable_layers(model) if lyr.name.endswith("c_fc"))
    assert isinstance(layer.module, Conv1D)
    w = layer.module.weight  # Conv1D: [in, out]
    assert layer.weight_oi().shape == (w.shape[1], w.shape[0])
    # y = x @ W for Conv1D, so the 2:4 groups must run along dim 0 of the native weight.
    pruner = Pruner(model, NM(2, 4))
    scores = {ly.name: ly.weight_oi().abs() for ly in pruner.layers}
    masks = pruner.stage_masks(scores, 1.0)
    apply_masks(model, masks)
    native = layer.module.weight.detach()
    assert ((native.t().reshape(-1, 4) != 0).sum(-1) <= 2).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_shrink_reloads_as_smaller_standard_model(family, tmp_path):
    model = build_tiny(family)
    ids = torch.randint(0, 256, (2, 8))
    blocks = mlp_blocks(model)
    assert len(blocks) == 2 and blocks[0].intermediate == 64
    pruner = Pruner(model, Channels(0.25))
    scores = {ly.name: ly.weight_oi().abs() for ly in pruner.layers}
    masks = pruner.stage_masks(scores, 1.0)
    apply_masks(model, masks)
    with torch.no_grad():
        masked_out = model(input_ids=ids).logits
    assert shrink_mlp(model, pruner.channel_keeps(masks)) == 48
    with torch.no_grad():
        shrunk_out = model(input_ids=ids).logits
    torch.testing.assert_close(shrunk_out, masked_out, atol=1e-4, rtol=1e-4)  # removing zeroed channels is exact
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, shrunk_out, atol=1e-5, rtol=1e-5)
