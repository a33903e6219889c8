import pytest
import torch

from sparsekd_deploy.core.patterns import NM, Channels, Unstructured, make_pattern
from sparsekd_deploy.core.schedule import opening_steps, plan
from sparsekd_deploy.errors import ConfigError


def test_2of4_golden_mask():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.4, 0.3]])
    keep = NM(2, 4).keep_mask(scores, 1.0)
    assert keep.tolist() == [[True, False, True, False, False, False, True, True]]


def test_nm_fraction_spreads_zeros_evenly_and_holds_at_end():
    torch.manual_seed(0)
    s = torch.rand(16, 32)
    half = NM(2, 4).keep_mask(s, 0.5)
    zeros_per_group = (~half).reshape(-1, 4).sum(-1)
    assert (zeros_per_group == 1).all()  # 2:4 in two stages goes through "3 of 4 kept"
    third = NM(2, 4).keep_mask(s, 1 / 3)
    assert (~third).sum().item() == round(2 / 3 * s.numel() / 4)
    assert set((~third).reshape(-1, 4).sum(-1).tolist()) <= {0, 1}
    final = NM(2, 4).keep_mask(s, 1.0)
    assert NM(2, 4).holds(s * final)
    assert not NM(2, 4).holds(s)


def test_nm_monotone_when_pruned_weights_score_minus_inf():
    torch.manual_seed(1)
    s = torch.rand(8, 16)
    first = NM(2, 4).keep_mask(s, 0.5)
    s2 = torch.rand(8, 16)
    s2[~first] = float("-inf")
    second = NM(2, 4).keep_mask(s2, 1.0)
    assert not (second & ~first).any()  # nothing pruned comes back


def test_unstructured_and_skip_reason():
    s = torch.arange(100.0).view(10, 10)
    keep = Unstructured(0.3).keep_mask(s, 1.0)
    assert (~keep).sum() == 30 and not keep.flatten()[:30].any()
    assert Unstructured(0.3).keep_mask(s, 0.5).logical_not().sum() == 15
    assert NM(2, 4).skip_reason(8, 30) == "in_features 30 is not a multiple of 4"
    assert NM(2, 4).skip_reason(8, 32) is None


def test_channels_remove_same_count():
    c = Channels(0.25)
    keep = c.channel_keep(torch.arange(64.0), 1.0)
    assert keep.sum() == 48 and not keep[:16].any()


def test_make_pattern():
    assert make_pattern("2:4") == NM(2, 4)
    assert make_pattern("1:8").spec == "1:8"
    assert make_pattern("unstructured:0.5").sparsity == 0.5
    assert make_pattern("channels:0.25").sparsity == 0.25
    for bad in ("4:4", "0:4", "unstructured:1.5", "channels:0", "unstructured:x", "nm"):
        with pytest.raises(ConfigError):
            make_pattern(bad)
    with pytest.raises(ValueError, match="available"):
        make_pattern("blocks:4")


def test_plan_labels():
    assert [s.label for s in plan(NM(2, 4), 2)] == ["3:4", "2:4"]
    assert [s.fraction for s in plan(Unstructured(0.5), 4)] == [0.25, 0.5, 0.75, 1.0]
    assert len(plan(NM(2, 4), 1)) == 1


def test_step_budget():
    from sparsekd_deploy.core.schedule import step_budget

    assert step_budget(3, 100, "equal") == [100, 100, 100]
    assert step_budget(3, 100, "backloaded") == [50, 100, 150]
    assert sum(step_budget(4, 7, "backloaded")) == 28
    assert step_budget(1, 9, "backloaded") == [9]
    assert [s.steps for s in plan(NM(2, 4), 2, 90, "backloaded")] == [60, 120]


def test_cubic_sparsity_schedule():
    from sparsekd_deploy.core.schedule import fractions

    assert fractions(3, "linear") == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert fractions(3, "cubic") == pytest.approx([1 - (2 / 3) ** 3, 1 - (1 / 3) ** 3, 1.0])
    assert [s.label for s in plan(NM(2, 4), 2, sparsity_schedule="cubic")] == ["2:4@88%", "2:4"]


@pytest.mark.parametrize("pattern", [NM(2, 4), Unstructured(0.5)])
def test_masks_are_made_on_the_scores_device(pattern):
    """Scores on a GPU give masks on that GPU (a CPU helper tensor failed on the H200: "src is on cpu"). The meta
    device stands in for it here: it refuses to mix with CPU tensors the same way."""
    assert pattern.keep_mask(torch.rand(4, 8, device="meta"), 0.5).device.type == "meta"
    assert Channels(0.5).channel_keep(torch.rand(8, device="meta"), 1.0).device.type == "meta"


def test_an_opening_phase_leaves_the_recovery_at_least_one_step():
    """Mask learning and a gradual demolition's fade take their steps from the stage by the same rule."""
    assert opening_steps(90, 0.5) == 45 and opening_steps(2, 0.9) == 1 and opening_steps(1, 0.5) == 0
