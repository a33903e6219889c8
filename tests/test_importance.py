import pytest
import torch
from conftest import build_tiny

from sparsekd_deploy.core.importance import IMPORTANCE, ScoringContext, score
from sparsekd_deploy.core.losses import kd_loss, make_loss
from sparsekd_deploy.core.operators import Power
from sparsekd_deploy.models.adapters import prunable_layers


def _ctx(family="llama"):
    model = build_tiny(family)
    teacher = build_tiny(family, seed=1)
    calib = [torch.randint(0, 256, (2, 8)) for _ in range(2)]

    def loss(ids):
        with torch.no_grad():
            t = teacher(input_ids=ids).logits
        return kd_loss(t, model(input_ids=ids).logits, Power(1.0), make_loss("forward-kl"))

    return ScoringContext(model, prunable_layers(model), calib, kd_loss=loss)


def test_registry_lists_all_criteria():
    assert IMPORTANCE.names() == ["fisher", "magnitude", "taylor", "wanda"]


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scores_have_out_in_layout(criterion, family):
    ctx = _ctx(family)
    scores = score(criterion, ctx)
    for layer in ctx.layers:
        s = scores[layer.name]
        assert s.shape == layer.weight_oi().shape
        assert torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0


def test_wanda_is_weight_times_input_norm():
    ctx = _ctx()
    layer = next(ly for ly in ctx.layers if ly.name.endswith("mlp.down_proj"))
    seen = []
    h = layer.module.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    scores = score("wanda", ctx)
    h.remove()
    x = torch.cat(seen[: len(ctx.calib)])
    expected = layer.weight_oi().detach().abs() * x.norm(dim=0)[None, :]
    torch.testing.assert_close(scores[layer.name], expected, rtol=1e-4, atol=1e-6)


def test_masked_weights_score_minus_inf():
    ctx = _ctx()
    layer = ctx.layers[0]
    keep = torch.ones_like(layer.module.weight, dtype=torch.bool)
    keep[0, :3] = False
    ctx.masks = {layer.param_name: keep}
    s = score("magnitude", ctx)[layer.name]
    assert torch.isinf(s[0, :3]).all() and torch.isfinite(s[1:]).all()


def test_fisher_drops_a_channel_whose_weights_are_large_but_whose_output_is_not():
    """Wanda sums a channel's |W| · ‖x‖ over its gate/up rows and down column: large input rows keep a channel
    whose output barely reaches the block's result. Fisher scores what the output does to the predictions."""
    from sparsekd_deploy.core.patterns import make_pattern
    from sparsekd_deploy.core.pruner import Pruner

    model = build_tiny("llama")
    pruner = Pruner(model, make_pattern("channels:0.5"))
    block = pruner.blocks[0]
    with torch.no_grad():
        for layer in block.inputs:
            layer.module.weight[0] *= 10.0  # channel 0: big gate/up rows...
        block.output.module.weight[:, 0] *= 1e-3  # ...and a near-silent down column
    calib = [torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))]
    ctx = ScoringContext(model, pruner.layers, calib)
    keeps = {name: pruner.channel_keeps(pruner.stage_masks(score(name, ctx), 1.0))[block.name]
             for name in ("wanda", "fisher")}
    assert keeps["wanda"][0] and not keeps["fisher"][0]
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradients behind


def test_fisher_refuses_weight_patterns_in_one_line():
    from sparsekd_deploy.config import build_config
    from sparsekd_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="importance fisher scores whole MLP channels"):
        build_config(None, {"pattern": "unstructured:0.5", "importance": "fisher"})
    assert build_config(None, {"pattern": "channels:0.5", "importance": "fisher"}).calib_batches == 32  # 256 seqs
    assert build_config(None, {"pattern": "channels:0.5", "importance": "fisher", "batch_size": 16}).calib_batches == 16
    assert build_config(None, {"pattern": "channels:0.5", "importance": "wanda"}).calib_batches == 4


def _fisher_setup(family="llama"):
    from sparsekd_deploy.core.patterns import make_pattern
    from sparsekd_deploy.core.pruner import Pruner

    model = build_tiny(family)
    pruner = Pruner(model, make_pattern("channels:0.5"))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 256, (8, 16), generator=g) for _ in range(8)]
    return model, pruner, calib


# Seeded golden values: the fisher scores of main's unchunked code (before the chunked loss) on _fisher_setup's tiny
# Llama: block 0's first three channel sums and the total over all layers.
FISHER_GOLDEN = ([0.264989, 1.098068, 0.493312], 63.677757)


@pytest.mark.parametrize("chunk", [0, 7, 16])
def test_fisher_scores_in_chunks_equal_the_unchunked_ones(chunk):
    model, pruner, calib = _fisher_setup()
    scores = score("fisher", ScoringContext(model, pruner.layers, calib, chunk=chunk))
    first = scores[pruner.blocks[0].output.name].sum(0)[:3].tolist()
    assert first == pytest.approx(FISHER_GOLDEN[0], rel=1e-4)
    assert float(sum(s.sum() for s in scores.values())) == pytest.approx(FISHER_GOLDEN[1], rel=1e-4)


def test_fisher_in_chunks_never_forms_more_than_a_chunk_of_logits():
    """Every tensor an operator makes with the vocabulary as its last dimension holds at most ``chunk`` positions
    (views such as the head weight's transpose excluded); the lm_head module is not called on
    more either."""
    from conftest import VOCAB
    from torch.utils._python_dispatch import TorchDispatchMode

    chunk = 16

    class Widest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # aliases (t, detach) of the head weight allocate nothing
                return out
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == VOCAB:
                    Widest.rows = max(Widest.rows, t.numel() // VOCAB)
            return out

    model, pruner, calib = _fisher_setup()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[:-1].numel()))
    try:
        with Widest():
            score("fisher", ScoringContext(model, pruner.layers, calib, chunk=chunk))
    finally:
        hook.remove()
    assert 0 < Widest.rows <= chunk  # 8 × 15 positions a batch: unchunked it would be 120
    assert all(n <= chunk for n in seen)
    Widest.rows = 0
    with Widest():
        score("fisher", ScoringContext(model, pruner.layers, calib, chunk=0))
    assert Widest.rows >= 8 * 15  # the same probe sees the full logits when not chunking


def test_fisher_chunks_by_the_automatic_rule_when_the_run_gave_none(monkeypatch):
    from sparsekd_deploy.core import losses

    monkeypatch.setattr(losses, "KD_CHUNK_AUTO_OVER", 64 * 256 * 4)  # 8 × 15 positions × 256 now "large"
    monkeypatch.setattr(losses, "KD_CHUNK_BYTES", 16 * 256 * 4)  # → 16 tokens a chunk
    model, pruner, calib = _fisher_setup()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[:-1].numel()))
    scores = score("fisher", ScoringContext(model, pruner.layers, calib))
    hook.remove()
    assert seen == [8]  # only check_head's probe went through lm_head: the loss used the split head
    assert float(sum(s.sum() for s in scores.values())) == pytest.approx(FISHER_GOLDEN[1], rel=1e-4)
