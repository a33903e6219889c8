"""numerics: each NumPy function against its PyTorch twin on random inputs, plus golden values worked out by hand."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsekd_deploy import numerics as N

SEEDS = range(5)


def rand_logits(seed, shape=(3, 4, 50), scale=4.0):
    return np.random.default_rng(seed).normal(0.0, scale, shape)


# -- twins ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_log_softmax_and_kl_twins_agree(seed):
    z, s = rand_logits(seed), rand_logits(seed + 100)
    lp, lq = N.log_softmax(z), N.log_softmax(s)
    assert lp.dtype == np.float64
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-12)
    lp_t, lq_t = N.log_softmax_torch(torch.from_numpy(z)), N.log_softmax_torch(torch.from_numpy(s))
    np.testing.assert_allclose(lp_t.numpy(), lp, atol=1e-12)
    kl = N.kl(lp, lq)
    assert kl.shape == z.shape[:-1] and (kl >= 0).all()
    np.testing.assert_allclose(N.kl_torch(lp_t, lq_t).numpy(), kl, rtol=1e-10, atol=1e-12)
    assert np.abs(N.kl(lp, lp)).max() < 1e-12
    # float32 on the torch side (the KD loss) stays close to the float64 reference
    kl32 = N.kl_torch(N.log_softmax_torch(torch.from_numpy(z).float()), N.log_softmax_torch(torch.from_numpy(s).float()))
    np.testing.assert_allclose(kl32.numpy(), kl, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 5, 50])
def test_bucket_twins_agree_and_bucket_kl_lower_bounds_kl(seed, k):
    z, s = rand_logits(seed, scale=6.0), rand_logits(seed + 100, scale=6.0)
    lp, lq = N.log_softmax(z), N.log_softmax(s)
    idx_t, P_t = N.topk_bucket_torch(torch.from_numpy(lp), k)
    idx = idx_t.numpy()
    assert idx.shape == z.shape[:-1] + (min(k, 50),) and P_t.shape[-1] == idx.shape[-1] + 1
    # the top-k really are the k largest, in descending order
    np.testing.assert_allclose(np.take_along_axis(lp, idx, -1), -np.sort(-lp, -1)[..., :k], atol=0)
    P = N.bucket(lp, idx)
    np.testing.assert_allclose(P_t.numpy(), P, atol=1e-12)
    np.testing.assert_allclose(N.bucket_torch(torch.from_numpy(lq), idx_t).numpy(), N.bucket(lq, idx), atol=1e-12)
    # buckets are a distribution (up to the tail clamp of ~1e-7 when the top-k hold everything)
    np.testing.assert_allclose(np.exp(P).sum(-1), 1.0, atol=2e-7)
    bkl = N.bucket_kl(P, lq, idx)
    np.testing.assert_allclose(N.bucket_kl_torch(P_t, torch.from_numpy(lq), idx_t).numpy(), bkl, rtol=1e-10,
                               atol=1e-12)
    assert (bkl <= N.kl(lp, lq) + 1e-6).all()  # data-processing inequality


@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_twins_agree(seed):
    p = np.exp(N.log_softmax(rand_logits(seed)))
    p[0, 0, :10] = 0.0  # exact zeros count as 0·log 0 = 0
    h = N.entropy(p)
    assert np.isfinite(h).all() and (h >= 0).all() and (h <= math.log(50) + 1e-12).all()
    np.testing.assert_allclose(N.entropy_torch(torch.from_numpy(p)).numpy(), h, rtol=1e-12)
    np.testing.assert_allclose(N.entropy_torch(torch.from_numpy(p).float()).numpy(), h, rtol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 10, 1.0), (1.0, 0, 0.9), (0.8, 20, 0.5), (1.0, 49, 0.99),
                          (0.0, 0, 1.0), (0.0, 5, 0.5)])
def test_sampling_distribution_twins_agree(seed, temperature, top_k, top_p):
    z = rand_logits(seed, (6, 50), scale=2.0)
    p = N.next_token_distribution(z, temperature, top_k, top_p)
    p_t = N.next_token_distribution_torch(torch.from_numpy(z), temperature, top_k, top_p)
    assert p.dtype == np.float64 and p_t.dtype == torch.float64
    np.testing.assert_allclose(p_t.numpy(), p, atol=1e-12)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
    if top_k:
        assert ((p > 0).sum(-1) <= top_k).all()
    assert (p.argmax(-1) == z.argmax(-1)).all()  # filtering never drops the most likely token
    # float32 in (the torch sampler's precision) keeps the same support
    p32 = N.next_token_distribution_torch(torch.from_numpy(z).float(), temperature, top_k, top_p)
    assert p32.dtype == torch.float32
    np.testing.assert_array_equal(p32.numpy() > 0, p > 0)
    np.testing.assert_allclose(p32.numpy(), p, atol=1e-5)


# -- golden values -------------------------------------------------------------------------------------------
def test_kl_golden():
    # 0.7 ln 1.4 + 0.2 ln(2/3) + 0.1 ln 0.5, and 0.5 ln(5/7) + 0.3 ln 1.5 + 0.2 ln 2
    lp, lq = np.log([0.7, 0.2, 0.1]), np.log([0.5, 0.3, 0.2])
    assert float(N.kl(lp, lq)) == pytest.approx(0.08512282595722158, abs=1e-14)
    assert float(N.kl(lq, lp)) == pytest.approx(0.09203285023383191, abs=1e-14)
    assert float(N.kl_torch(torch.from_numpy(lp), torch.from_numpy(lq))) == pytest.approx(0.08512282595722158,
                                                                                          abs=1e-14)
    np.testing.assert_allclose(N.log_softmax(np.log([0.7, 0.2, 0.1]) + 3.0), lp, atol=1e-15)


def test_bucket_golden_and_tail_clamp():
    lp = np.log([0.5, 0.3, 0.15, 0.05])
    idx = np.array([0, 1])
    np.testing.assert_allclose(np.exp(N.bucket(lp, idx)), [0.5, 0.3, 0.2], atol=1e-15)
    # top-k holding all the mass: the tail is log(1 - e^(-1e-7)), finite, in both twins
    full = np.array([0, 1, 2, 3])
    assert N.bucket(lp, full)[-1] == pytest.approx(-16.118095700958, abs=1e-9)
    assert float(N.bucket_torch(torch.from_numpy(lp), torch.from_numpy(full))[-1]) == pytest.approx(
        -16.118095700958, abs=1e-9)
    assert float(N.topk_bucket_torch(torch.from_numpy(lp).float(), 4)[1][-1]) == pytest.approx(-16.1181, abs=1e-3)
    # log-probs below LOG_FLOOR are floored (the tail here is the clamped one: the head holds all the mass)
    tiny = np.array([0.0, -150.0, -200.0])
    np.testing.assert_allclose(N.bucket(tiny, np.array([0, 1])), [0.0, -100.0, -16.118095700958], atol=1e-9)
    # K larger than V: capped
    assert N.topk_bucket_torch(torch.from_numpy(lp), 10)[0].shape == (4,)


def test_bucket_kl_golden():
    # teacher [0.5, 0.3 | 0.15 + 0.05], uniform student [0.25, 0.25 | 0.5]:
    # 0.5 ln 2 + 0.3 ln 1.2 + 0.2 ln 0.4
    lp, lq = np.log([0.5, 0.3, 0.15, 0.05]), np.log([0.25] * 4)
    idx = np.array([0, 1])
    assert float(N.bucket_kl(N.bucket(lp, idx), lq, idx)) == pytest.approx(0.218011910943328, abs=1e-12)


def test_entropy_golden():
    assert float(N.entropy(np.array([0.5, 0.25, 0.25]))) == pytest.approx(1.0397207708399179, abs=1e-12)
    assert float(N.entropy(np.array([1.0, 0.0, 0.0]))) == 0.0
    assert float(N.entropy_torch(torch.tensor([1.0, 0.0, 0.0]))) == 0.0


def test_top_k_and_top_p_filtering_golden():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    for f in (N.next_token_distribution, lambda z, *a, **kw: N.next_token_distribution_torch(
            torch.from_numpy(z), *a, **kw).numpy()):
        np.testing.assert_allclose(f(logits, 1.0, top_k=2), [[0.625, 0.375, 0, 0]], atol=1e-9)
        np.testing.assert_allclose(f(logits, 1.0, top_p=0.75), [[0.625, 0.375, 0, 0]], atol=1e-9)
        np.testing.assert_allclose(f(logits, 1.0, top_p=0.81), [[0.5, 0.3, 0.15, 0]] / np.float64(0.95), atol=1e-9)
        assert f(logits, 0.1)[0, 0] > 0.99
        np.testing.assert_array_equal(f(logits, 0.0), [[1.0, 0, 0, 0]])
        # T = 2: p ∝ sqrt(p)
        np.testing.assert_allclose(f(logits, 2.0), np.sqrt([[0.5, 0.3, 0.15, 0.05]]) / np.sqrt(
            [0.5, 0.3, 0.15, 0.05]).sum(), atol=1e-12)


def test_top_p_ties_are_broken_in_index_order_in_both_twins():
    logits = np.log(np.array([[0.2, 0.4, 0.4]]))
    expected = [[0.0, 1.0, 0.0]]  # the first of the tied tokens reaches top_p alone
    np.testing.assert_array_equal(N.next_token_distribution(logits, 1.0, top_p=0.3), expected)
    np.testing.assert_array_equal(N.next_token_distribution_torch(torch.from_numpy(logits), 1.0, top_p=0.3).numpy(),
                                  expected)


# -- seeding -------------------------------------------------------------------------------------------------
def test_numpy_draw_is_per_row_seeded():
    p = N.next_token_distribution(rand_logits(0, (5, 50), scale=1.0), 1.0)
    seeds = [5, 6, 7, 8, 9]
    rngs = N.row_generators(seeds)
    steps = np.stack([N.draw(p, rngs) for _ in range(4)], 1)
    rngs_chunked = [N.row_generators(seeds[:2]), N.row_generators(seeds[2:])]
    chunked = np.stack([np.concatenate([N.draw(p[:2], rngs_chunked[0]), N.draw(p[2:], rngs_chunked[1])])
                        for _ in range(4)], 1)
    np.testing.assert_array_equal(steps, chunked)  # row i depends on seeds[i] only
    assert steps.dtype == np.int64 and not (steps == steps[:, :1]).all()  # it does sample
    one_hot = N.next_token_distribution(rand_logits(1, (5, 50)), 0.0)
    np.testing.assert_array_equal(N.draw(one_hot, N.row_generators(seeds)), one_hot.argmax(-1))


def test_torch_draw_is_seeded_by_its_generator():
    probs = N.next_token_distribution_torch(torch.from_numpy(rand_logits(0, (5, 50), scale=1.0)).float(), 1.0)
    a = N.draw_torch(probs, torch.Generator().manual_seed(3))
    b = N.draw_torch(probs, torch.Generator().manual_seed(3))
    c = N.draw_torch(probs, torch.Generator().manual_seed(4))
    assert a.shape == (5, 1) and torch.equal(a, b) and not torch.equal(a, c)


# -- device side ---------------------------------------------------------------------------------------------
def test_numerics_and_validation_metrics_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "import sparsekd_deploy.numerics as N, sparsekd_deploy.validate.metrics, sparsekd_deploy.targets.base\n"
            "lp = N.log_softmax(np.array([[1.0, 2.0, 3.0]]))\n"
            "print(float(N.bucket_kl(N.bucket(lp, np.array([[2]])), lp, np.array([[2]]))[0]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(0.0, abs=1e-12)
