import pytest
import torch
from conftest import build_tiny

from sparsekd_deploy.core import consistency
from sparsekd_deploy.core.sampling import sample


def test_metric_golden_values():
    samples = [(1, 2, 3), (1, 2, 4), (1, 2, 3), (5, 6, 7)]
    assert consistency.pairwise_agreement(samples, 2) == pytest.approx(3 / 6)
    assert consistency.pairwise_agreement(samples, 3) == pytest.approx(1 / 6)
    assert consistency.modal_share(samples, 2) == pytest.approx(3 / 4)
    assert consistency.distinct_2(samples) == pytest.approx(5 / 8)


def test_sampling_is_seeded_and_greedy_has_zero_entropy():
    model = build_tiny("llama")
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(0))
    a, ea = sample(model, prompt, 6, 1.0, torch.Generator().manual_seed(7))
    b, _ = sample(model, prompt, 6, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (3, 6) and (ea > 0).all()
    g, eg = sample(model, prompt, 6, 0.0)
    assert torch.equal(g, model.generate(prompt, max_new_tokens=6, do_sample=False)[:, 4:])
    assert torch.allclose(eg, torch.zeros_like(eg))


def test_colder_sampling_is_more_consistent():
    model = build_tiny("llama")
    prompts = torch.randint(0, 256, (4, 4), generator=torch.Generator().manual_seed(0))
    hot = consistency.measure(model, prompts, 8, 6, 1.5, m=2)
    cold = consistency.measure(model, prompts, 8, 6, 0.05, m=2)
    assert cold["mean_entropy"] < hot["mean_entropy"]
    assert cold["pairwise_agreement@2"] >= hot["pairwise_agreement@2"]
