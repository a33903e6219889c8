"""fsdp_nm.weakest: the layer-wide choice of a partial n:m stage made by selection, as NM.keep_mask's stable argsort
makes it (ties by index), on seeded values full of ties, -inf (earlier stages' zeros), ±0 and NaN."""

import torch

from sparsekd_deploy.core.fsdp_nm import weakest


def test_weakest_picks_what_the_stable_argsort_picks():
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(300):
        n = int(torch.randint(1, 200, (1,), generator=gen))
        values = (torch.randn(n, generator=gen) * 3).round()  # integers: many ties
        if trial % 3 == 0:
            values[torch.rand(n, generator=gen) < 0.3] = float("-inf")
        if trial % 5 == 0:
            values[torch.rand(n, generator=gen) < 0.3] = -0.0
        if trial % 7 == 0:
            values[torch.rand(n, generator=gen) < 0.1] = float("nan")
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            expected = torch.zeros(n, dtype=torch.bool)
            expected[values.argsort(stable=True)[:k]] = True
            assert torch.equal(weakest(values, k), expected), (trial, k)
            checked += 1
    assert checked > 1000


def test_weakest_takes_tied_values_in_index_order():
    values = torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0, 0.0])
    assert weakest(values, 3).tolist() == [False, True, False, True, False, True]
