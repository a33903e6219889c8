"""Golden numbers, computed by hand for p = [0.7, 0.2, 0.1], q = [0.5, 0.3, 0.2]."""

import math

import pytest
import torch

from sparsekd_deploy.core.losses import kd_loss, make_loss
from sparsekd_deploy.core.operators import Power, TopK
from sparsekd_deploy.errors import ConfigError

P = torch.tensor([0.7, 0.2, 0.1])
Q = torch.tensor([0.5, 0.3, 0.2])
FKL = sum(p * math.log(p / q) for p, q in zip(P.tolist(), Q.tolist(), strict=True))
RKL = sum(q * math.log(q / p) for p, q in zip(P.tolist(), Q.tolist(), strict=True))
M = [(p + q) / 2 for p, q in zip(P.tolist(), Q.tolist(), strict=True)]
JS = 0.5 * sum(p * math.log(p / m) for p, m in zip(P.tolist(), M, strict=True)) + 0.5 * sum(
    q * math.log(q / m) for q, m in zip(Q.tolist(), M, strict=True)
)


def test_golden_values():
    assert FKL == pytest.approx(0.0851228, abs=1e-6)
    assert RKL == pytest.approx(0.0920330, abs=1e-6)
    lp, lq = P.log(), Q.log()
    assert make_loss("forward-kl")(lp, lq).item() == pytest.approx(FKL, abs=1e-6)
    assert make_loss("reverse-kl")(lp, lq).item() == pytest.approx(RKL, abs=1e-6)
    assert make_loss("js")(lp, lq).item() == pytest.approx(JS, abs=1e-6)
    assert make_loss("mixed:0.25")(lp, lq).item() == pytest.approx(0.25 * FKL + 0.75 * RKL, abs=1e-6)
    assert make_loss("mixed")(lp, lq).item() == pytest.approx(0.5 * (FKL + RKL), abs=1e-6)


def test_kd_loss_power_applies_T_squared():
    t_logits, s_logits = P.log()[None, None], Q.log()[None, None]
    T = 2.0
    pt = torch.softmax(P.log() / T, -1)
    qt = torch.softmax(Q.log() / T, -1)
    expected = T * T * float((pt * (pt / qt).log()).sum())
    got = kd_loss(t_logits, s_logits, Power(T), make_loss("forward-kl"))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_zero_for_identical_and_finite_with_topk():
    z = torch.randn(2, 5, 11)
    assert kd_loss(z, z, Power(1.0), make_loss("forward-kl")).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 5, 11, requires_grad=True)
    loss = kd_loss(z, s, TopK(3), make_loss("reverse-kl"))
    loss.backward()
    assert torch.isfinite(s.grad).all() and loss.item() >= 0


def test_kd_loss_mask_selects_positions():
    z, s = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    mask = torch.tensor([[1, 0, 0, 1]])
    full = kd_loss(z, s, Power(1.0), make_loss("forward-kl"))
    masked = kd_loss(z, s, Power(1.0), make_loss("forward-kl"), mask)
    per = make_loss("forward-kl")(torch.log_softmax(z, -1), torch.log_softmax(s, -1))[0]
    assert masked.item() == pytest.approx(per[[0, 3]].mean().item(), rel=1e-5)
    assert full.item() == pytest.approx(per.mean().item(), rel=1e-5)


def test_loss_errors():
    with pytest.raises(ConfigError):
        make_loss("mixed:2")
    with pytest.raises(ValueError, match="available"):
        make_loss("hinge")
