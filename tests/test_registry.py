import subprocess
import sys
from pathlib import Path

import pytest

from sparsekd_deploy.registry import Registry, UnknownNameError

TESTS = Path(__file__).parent


def test_registry_rules():
    r = Registry("widget")
    r.register("a")(1)
    with pytest.raises(RuntimeError, match="registered twice"):
        r.register("a")(2)
    with pytest.raises(UnknownNameError, match="unknown widget 'b'; available: a"):
        r.get("b")


# Every registered plug-in is exercised against its kind's contract here, by iterating over the registry: a new
# pattern, criterion, operator or loss is tested the moment it is registered (a name search in the test files,
# as before, was satisfied by any mention of "torch" or "tensorrt").
_SPEC = {"nm": "2:4", "unstructured": "unstructured:0.5", "channels": "channels:0.5", "power": "power:2",
         "mix": "mix:0.1", "topk": "topk:4", "mixed": "mixed:0.5"}


def _names(registry):
    return [(registry.kind, name) for name in registry.names()]


def _logp(seed):
    import torch

    return torch.log_softmax(torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(seed)) * 2, -1)


@pytest.mark.parametrize("kind,name", _names(__import__("sparsekd_deploy.core.losses", fromlist=["LOSSES"]).LOSSES))
def test_every_loss_is_a_divergence(kind, name):
    import torch

    from sparsekd_deploy.core.losses import make_loss

    loss = make_loss(_SPEC.get(name, name))
    p, q = _logp(0), _logp(1)
    assert torch.allclose(loss(p, p), torch.zeros(3, 5), atol=1e-6)  # zero on equal distributions
    assert (loss(p, q) > 1e-3).all()  # positive on different ones


@pytest.mark.parametrize("kind,name",
                         _names(__import__("sparsekd_deploy.core.operators", fromlist=["OPERATORS"]).OPERATORS))
def test_every_operator_maps_both_sides_to_one_outcome_space(kind, name):
    import torch

    from sparsekd_deploy.core.operators import make_operator

    op = make_operator(_SPEC.get(name, name))
    P, Q = op.pair(_logp(0), _logp(1))
    assert P.shape == Q.shape
    assert torch.allclose(P.exp().sum(-1), torch.ones(3, 5), atol=1e-5)
    assert torch.allclose(Q.exp().sum(-1), torch.ones(3, 5), atol=1e-5)
    P2, Q2 = op.pair(_logp(0), _logp(0))
    assert torch.allclose(P2, Q2)


@pytest.mark.parametrize("kind,name",
                         _names(__import__("sparsekd_deploy.core.patterns", fromlist=["PATTERNS"]).PATTERNS))
def test_every_pattern_removes_its_target_share_least_important_first(kind, name):
    import torch

    from sparsekd_deploy.core.patterns import make_pattern

    pattern = make_pattern(_SPEC.get(name, name))
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    if pattern.structured:  # whole channels: scored per channel
        keep = pattern.channel_keep(scores[0], 1.0)
        removed = scores[0][~keep]
        assert (~keep).float().mean().item() == pytest.approx(pattern.target_sparsity(), abs=1 / 16)
        assert removed.max() <= scores[0][keep].min()
        return
    keep = pattern.keep_mask(scores, 1.0)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert (~keep).float().mean().item() == pytest.approx(pattern.target_sparsity(), abs=1e-6)
    assert pattern.holds(scores * keep) and not pattern.holds(scores)
    half = pattern.keep_mask(scores, 0.5)  # a stage applies a fraction of the pattern
    assert 0 < (~half).sum() < (~keep).sum()


@pytest.mark.parametrize("kind,name",
                         _names(__import__("sparsekd_deploy.core.importance", fromlist=["IMPORTANCE"]).IMPORTANCE))
def test_every_importance_criterion_scores_every_weight(kind, name, tiny_dirs):
    import torch

    from sparsekd_deploy.core.importance import IMPORTANCE, ScoringContext, score
    from sparsekd_deploy.models.adapters import prunable_layers
    from sparsekd_deploy.models.loading import load_model

    model = load_model(tiny_dirs["llama"])
    layers = prunable_layers(model)
    calib = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))]

    def kd(ids):
        return model(input_ids=ids).logits.float().pow(2).mean()  # any differentiable loss on the student

    if getattr(IMPORTANCE.get(name), "scores_channels", False):  # a channel criterion: every channel of every MLP
        from sparsekd_deploy.core.patterns import make_pattern
        from sparsekd_deploy.core.pruner import Pruner

        pruner = Pruner(model, make_pattern("channels:0.5"))
        scores = score(name, ScoringContext(model, pruner.layers, calib, kd_loss=kd))
        assert set(scores) == {ly.name for ly in pruner.layers}
        for b in pruner.blocks:
            ch = sum(scores[ly.name].sum(1) for ly in b.inputs) + scores[b.output.name].sum(0)
            assert ch.shape == (b.intermediate,) and torch.isfinite(ch).all() and (ch > 0).all()
        return
    scores = score(name, ScoringContext(model, layers, calib, kd_loss=kd))
    assert set(scores) == {ly.name for ly in layers}
    for ly in layers:
        s = scores[ly.name]
        assert s.shape == ly.weight_oi().shape and torch.isfinite(s).all() and (s >= 0).all() and s.max() > 0


@pytest.mark.parametrize("name", ["onnxruntime", "tensorrt", "torch"])
def test_every_target_refuses_a_missing_model_with_one_clear_error(name, tmp_path):
    """Every registered target (each has its own module of runtime tests) answers a file that is not there with a
    one-line error (TargetError, or the runtime's own "not installed" error), never a traceback."""
    import sparsekd_deploy.targets.onnxruntime  # noqa: F401
    import sparsekd_deploy.targets.tensorrt  # noqa: F401
    import sparsekd_deploy.targets.torch_cuda  # noqa: F401
    from sparsekd_deploy.errors import SparseKDError
    from sparsekd_deploy.targets.base import TARGETS, make_target

    assert set(TARGETS.names()) == {"onnxruntime", "tensorrt", "torch"}, "a new target needs its row here"
    with pytest.raises(SparseKDError):
        make_target(name, tmp_path / "missing.onnx")


def test_import_and_help_stay_light():
    """`import sparsekd_deploy` and `--help` must work without TensorRT / onnxruntime / CUDA paths."""
    code = ("import sys, sparsekd_deploy, sparsekd_deploy.cli\n"
            "from click.testing import CliRunner\n"
            "assert CliRunner().invoke(sparsekd_deploy.cli.main, ['--help']).exit_code == 0\n"
            "heavy = [m for m in ('tensorrt', 'onnxruntime', 'optimum', 'torch') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
