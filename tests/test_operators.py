import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekd_deploy.core.operators import Mix, Power, TopK, make_operator
from sparsekd_deploy.errors import ConfigError

logits_st = st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=12).map(
    lambda xs: torch.tensor(xs, dtype=torch.float64)
)


def ent(logp):
    return float(-(logp.exp() * logp).sum())


def logp_of(z):
    return torch.log_softmax(z, -1)


@given(logits_st)
def test_identity_at_neutral_parameter(z):
    lp = logp_of(z)
    assert torch.allclose(Power(1.0).apply(lp), lp.clamp_min(-100), atol=1e-9)
    assert torch.allclose(Mix(0.0).apply(lp), lp.clamp_min(-100), atol=1e-9)
    # top-k with K = V keeps everything; the tail bucket is empty
    tk = TopK(len(z)).apply(lp).exp()
    assert torch.allclose(tk[:-1].sort().values, lp.exp().sort().values, atol=1e-9)
    assert tk[-1] < 1e-6


@given(logits_st, st.floats(0.1, 20), st.floats(0.0, 1.0))
def test_ranking_preserved(z, T, lam):
    lp = logp_of(z)
    for op in (Power(T), Mix(lam)):
        out = op.apply(lp)
        for i in range(len(z)):
            for j in range(len(z)):
                if lp[i] > lp[j] + 1e-9:
                    assert out[i] >= out[j] - 1e-9


@given(logits_st, st.floats(0.2, 10), st.floats(0.2, 10))
def test_power_entropy_non_decreasing_in_T(z, a, b):
    lo, hi = sorted((a, b))
    lp = logp_of(z)
    assert ent(Power(hi).apply(lp)) >= ent(Power(lo).apply(lp)) - 1e-9


@given(logits_st, st.floats(0, 1), st.floats(0, 1))
def test_mix_entropy_non_decreasing_in_lambda(z, a, b):
    lo, hi = sorted((a, b))
    lp = logp_of(z)
    assert ent(Mix(hi).apply(lp)) >= ent(Mix(lo).apply(lp)) - 1e-9


@given(logits_st)
@settings(max_examples=30)
def test_uniform_in_the_limit(z):
    lp = logp_of(z)
    V = len(z)
    for out in (Power(1e6).apply(lp), Mix(1.0).apply(lp)):
        assert torch.allclose(out.exp(), torch.full((V,), 1.0 / V, dtype=out.dtype), atol=1e-4)


@given(logits_st, st.integers(1, 12))
def test_topk_is_a_coarse_graining_that_lower_bounds_kl(z, k):
    lp = logp_of(z)
    lq = logp_of(z.flip(0) * 0.5)
    P, Q = TopK(k).pair(lp, lq)
    assert P.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert Q.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    full = float((lp.exp() * (lp - lq)).sum())
    bucketed = float((P.exp() * (P - Q)).sum())
    assert bucketed <= full + 1e-6  # data-processing inequality


def test_make_operator_specs_and_errors():
    assert make_operator("power:2").T == 2.0
    assert make_operator("power").T == 1.0
    assert make_operator("mix:0.1").lam == pytest.approx(0.1)
    assert make_operator("topk:8").K == 8
    assert make_operator("power:2").loss_scale == 4.0
    for bad in ("power:0", "power:-1", "mix:1.5", "topk:0", "power:abc"):
        with pytest.raises(ConfigError):
            make_operator(bad)
    with pytest.raises(ValueError, match="available: mix, power, topk"):
        make_operator("cube:2")


def test_power_matches_softmax_of_scaled_logits():
    z = torch.tensor([2.0, 0.5, -1.0])
    assert torch.allclose(Power(2.0).apply(torch.log_softmax(z, -1)), torch.log_softmax(z / 2, -1))
    assert math.isfinite(float(Power(0.01).apply(torch.log_softmax(z, -1)).sum()))
