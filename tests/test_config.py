import pytest

from sparsekd_deploy.config import DistillConfig, build_config
from sparsekd_deploy.errors import ConfigError


def test_defaults_are_valid():
    cfg = build_config()
    # 2:4: one stage (staging does not pay there), one sparsity for every layer
    assert cfg == DistillConfig(stages=1, steps_per_stage=300, allocation="uniform", importance="wanda",
                                compensation="off", calib_batches=4)


@pytest.mark.parametrize("pattern,importance,compensation,calib", [
    ("2:4", "wanda", "off", 4), ("unstructured:0.8", "wanda", "off", 4), ("channels:0.5", "fisher", "ls", 32),
    ("channels:auto", "fisher", "ls", 32)])
def test_channel_patterns_default_to_fisher_scores_and_a_refit(pattern, importance, compensation, calib):
    cfg = build_config(None, {"pattern": pattern})
    assert (cfg.importance, cfg.compensation, cfg.calib_batches) == (importance, compensation, calib)
    cfg = build_config(None, {"pattern": pattern, "importance": "magnitude", "compensation": "off"})
    assert (cfg.importance, cfg.compensation, cfg.calib_batches) == ("magnitude", "off", 4)


def test_mask_learning_keeps_channels_off_fisher_and_the_refit():
    # sr-ste restarts from the pre-prune weights and re-ranks by |W|·‖x‖: it would silently undo both
    cfg = build_config(None, {"pattern": "channels:0.5", "mask_learning": "sr-ste"})
    assert (cfg.importance, cfg.compensation) == ("wanda", "off")
    with pytest.raises(ConfigError) as e:
        build_config(None, {"pattern": "channels:0.5", "mask_learning": "sr-ste", "importance": "fisher",
                            "compensation": "ls"})
    assert "undoes compensation ls" in str(e.value) and "replaces importance fisher" in str(e.value)


@pytest.mark.parametrize("pattern,allocation", [("2:4", "uniform"), ("unstructured:0.8", "loadpath"),
                                                ("channels:0.5", "uniform"), ("unstructured:auto", "uniform")])
def test_allocation_default_follows_the_pattern(pattern, allocation):
    assert build_config(None, {"pattern": pattern}).allocation == allocation
    assert build_config(None, {"pattern": pattern, "allocation": "uniform"}).allocation == "uniform"


@pytest.mark.parametrize("overrides,stages,steps", [
    ({}, 1, 300), ({"pattern": "1:4"}, 1, 300), ({"pattern": "unstructured:0.8"}, 3, 100),
    ({"pattern": "channels:0.5"}, 1, 300), ({"pattern": "unstructured:0.5"}, 1, 300),
    ({"pattern": "channels:0.7"}, 3, 100), ({"pattern": "unstructured:auto"}, 3, 100),
    ({"stages": 2}, 2, 150), ({"pattern": "2:4", "stages": 3}, 3, 100),
    ({"pattern": "unstructured:0.8", "steps_per_stage": 40}, 3, 40),
])
def test_stage_count_follows_the_removal_and_the_step_budget_stays_300(overrides, stages, steps):
    cfg = build_config(None, overrides)
    assert (cfg.stages, cfg.steps_per_stage) == (stages, steps)


def test_recipe_then_flags_override(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("pattern: unstructured:0.5\nstages: 4\nkl-budget: 0.3\nconsistency_temperatures: 0.7\n")
    cfg = build_config(r, {"stages": 2, "pattern": None})
    assert cfg.pattern == "unstructured:0.5" and cfg.stages == 2 and cfg.kl_budget == 0.3
    assert cfg.consistency_temperatures == [0.7]


def test_every_problem_reported_at_once(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("patern: 2:4\nstagez: 3\nkl_budget: -1\nstages: 0\nsteps_per_stage: lots\nloss: hinge\n")
    with pytest.raises(ConfigError) as e:
        build_config(r)
    msg = str(e.value)
    for needle in ("unknown recipe key 'patern'", "unknown recipe key 'stagez'", "allowed keys:",
                   "steps_per_stage: expected an integer", "kl_budget must be a finite number > 0", "stages must be ≥ 1",
                   "unknown loss 'hinge'"):
        assert needle in msg
    assert len(e.value.problems) >= 7


@pytest.mark.parametrize("overrides,needle", [
    ({"kl_budget": 0.0}, "kl_budget"), ({"stages": 0}, "stages"), ({"pattern": "3:3"}, "pattern"),
    ({"importance": "random"}, "importance"), ({"data": "/nope.txt"}, "does not exist"),
])
def test_bad_values(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(None, overrides)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(bad)
    bad.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(bad)
