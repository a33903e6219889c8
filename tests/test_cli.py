import json

import pytest
from click.testing import CliRunner

from sparsekd_deploy.cli import main

FAST = ["--stages", "1", "--steps-per-stage", "3", "--retries", "0", "--kl-budget", "50", "--seq-len", "16",
        "--num-samples", "8", "--batch-size", "4"]


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_help_lists_commands():
    r = run(["--help"])
    assert r.exit_code == 0 and "distill" in r.output


def test_distill_json(tiny_dirs, tmp_path):
    r = run(["distill", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), "--json", *FAST])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["reached_target"] and summary["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("args,needle", [
    (["--teacher", "/definitely/missing"], "does not exist"),
    (["--teacher", "org/some-model"], "huggingface-cli download"),
    (["--kl-budget", "0"], "kl_budget must be"),
    (["--stages", "0"], "stages must be"),
    (["--pattern", "2:3"], "fits no layer"),
])
def test_user_mistakes_are_one_line(tiny_dirs, tmp_path, args, needle):
    base = ["distill", "--out", str(tmp_path / "o"), *FAST]
    if "--teacher" not in args:
        base += ["--teacher", str(tiny_dirs["llama"])]
    r = run(base + args)
    assert r.exit_code == 2
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_recipe_problems_all_at_once(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("foo: 1\nbar: 2\nstages: 0\n")
    r = run(["distill", "--recipe", str(rec), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "'foo'" in r.output and "'bar'" in r.output and "stages must be" in r.output


def test_target_not_reached_exit_1(tiny_dirs, tmp_path):
    r = run(["distill", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), *FAST[:6],
             "--kl-budget", "1e-12", *FAST[8:]])
    assert r.exit_code == 1
    assert "target not reached" in r.output
    assert (tmp_path / "o" / "student" / "config.json").is_file()


def test_existing_output_refused(tiny_dirs, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    r = run(["distill", "--teacher", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def _help_defaults(command):
    """flag → the text of its ``[default: …]`` in ``COMMAND --help`` (the help as a user reads it, rewrapped)."""
    import re

    found, flag, words = {}, None, []
    for line in run([command, "--help"]).output.splitlines() + ["  --end"]:
        start = re.match(r"  (--[a-z0-9-]+)", line)  # an option's own line (flags named in help text are indented more)
        if start:
            d = re.search(r"\[default: ([^\]]+)\]", " ".join(words))
            if flag and d:
                found[flag] = d.group(1)
            flag, words = start.group(1), []
        words += line.split()
    return found


@pytest.mark.parametrize("command", ["distill", "build"])
def test_distill_help_defaults_are_what_a_run_without_the_flag_uses(command):
    """A user reads the defaults off --help; the help said --stages 3 and --steps-per-stage 100 after the defaults
    had become 1 stage of 300 steps at 2:4."""
    from sparsekd_deploy.commands.distill import DISTILL_OPTIONS
    from sparsekd_deploy.config import build_config

    helps = _help_defaults(command)
    demo = build_config()  # 2:4, the demo's pattern
    # defaults that exist only with the flag that turns them on
    only_with = {"mask_learning_share": {"mask_learning": "sr-ste"}, "demolition_share": {"demolition": "gradual"}}
    checked = 0
    for flag, field, _ in DISTILL_OPTIONS:
        said = helps.get(flag)
        if said is None or " " in said:  # no default stated, or a rule (checked below)
            continue
        value = getattr(build_config(overrides=only_with[field]) if field in only_with else demo, field)
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        try:
            assert float(said) == pytest.approx(float(value)), flag
        except (TypeError, ValueError):
            assert said == str(value), flag
        checked += 1
    assert checked >= 15
    assert helps["--stages"] == "1 for n:m and for targets ≤ 0.5, else 3"
    assert helps["--steps-per-stage"] == "300 ÷ stages"
    stages = {p: build_config(overrides={"pattern": p}) for p in ("2:4", "unstructured:0.5", "channels:0.5",
                                                                  "unstructured:0.8")}
    assert [(c.stages, c.steps_per_stage) for c in stages.values()] == [(1, 300), (1, 300), (1, 300), (3, 100)]
