"""Recipe and option values of the wrong type: one ConfigError listing every problem, never a TypeError from the
range checks (issue 8, item 9); and the ``tokenizer`` field (item 6)."""

from __future__ import annotations

import pytest

from sparsekd_deploy.config import FIELDS, build_config
from sparsekd_deploy.errors import ConfigError


def _recipe(tmp_path, text):
    r = tmp_path / "r.yaml"
    r.write_text(text)
    return r


def _problems(recipe=None, overrides=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        build_config(recipe, overrides)
    return e.value.problems


def test_list_where_a_number_belongs(tmp_path):
    assert _problems(_recipe(tmp_path, "consistency_temperatures: [[0.7]]\n")) == [
        "consistency_temperatures: expected a list of numbers, got [[0.7]]"
    ]
    assert _problems(None, {"stages": [3]}) == ["stages: expected an integer or nothing, got [3]"]


def test_number_where_a_list_belongs(tmp_path):
    assert _problems(_recipe(tmp_path, "include: 5\n")) == ["include: expected a list of text, got 5"]


def test_every_field_of_the_wrong_type_is_reported_at_once(tmp_path):
    # A mapping fits no field: one problem per field, each naming it, none a TypeError.
    text = "".join(f"{name}: {{a: 1}}\n" for name in FIELDS)
    problems = _problems(_recipe(tmp_path, text))
    assert [p.split(":")[0] for p in problems] == list(FIELDS)
    assert all(": expected " in p and "got {'a': 1}" in p for p in problems)


def test_wrong_list_items_and_nulls(tmp_path):
    r = _recipe(tmp_path, "consistency_temperatures: [1.0, hot]\nexclude: [lm_head, 3]\nbatch_size:\nteacher:\n")
    assert _problems(r) == [
        "consistency_temperatures: expected a list of numbers, got [1.0, 'hot']",
        "exclude: expected a list of text, got ['lm_head', 3]",
        "batch_size: expected an integer, got nothing (null)",
    ]


def test_unquoted_pattern_is_a_number_to_yaml(tmp_path):
    # YAML 1.1 reads 2:4 as the base-60 number 124.
    assert _problems(_recipe(tmp_path, "pattern: 2:4\n")) == [
        "pattern: expected text, got 124 (quote it in the recipe to make it text)"
    ]


def test_exponent_without_a_dot_is_still_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as text; it is plainly meant as a number.
    assert build_config(_recipe(tmp_path, "lr: 1e-4\nkl_budget: 2\n")).lr == 1e-4


def test_non_finite_temperature(tmp_path):
    assert _problems(_recipe(tmp_path, "consistency_temperatures: [1.0, .nan]\n")) == [
        "consistency_temperatures must be a non-empty list of finite numbers > 0"
    ]


def test_overrides_are_type_checked_too():
    assert _problems(None, {"stages": "3", "include": 5, "stagez": 1}) == [
        "stages: expected an integer or nothing, got '3'",
        "include: expected a list of text, got 5",
        "unknown option 'stagez'",
    ]


def test_tokenizer_from_the_recipe(tmp_path):
    (tmp_path / "tok").mkdir()
    assert build_config(_recipe(tmp_path, f"tokenizer: {tmp_path / 'tok'}\n")).tokenizer == str(tmp_path / "tok")
    assert build_config(None, {"tokenizer": str(tmp_path / "tok")}).tokenizer == str(tmp_path / "tok")
    assert _problems(None, {"tokenizer": str(tmp_path / "nope")}) == [
        f"tokenizer dir {str(tmp_path / 'nope')!r} does not exist"
    ]


def test_a_recipe_that_is_not_utf8_is_one_problem(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_bytes(b"\xff\xfestages: 2\n")
    assert _problems(r) == [f"recipe {r} is not UTF-8 text (invalid start byte at byte 0); save the YAML file as UTF-8"]


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**24])
def test_a_seed_torch_cannot_take_is_refused(seed):
    assert _problems(None, {"seed": seed}) == [
        f"seed must be a whole number from -2**63 to below 2**64 - 2**20, got {seed}"]
