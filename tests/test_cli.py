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
