"""End-to-end staged SparseKD on tiny models of four families."""

import json

import pytest
import torch
from conftest import FAMILIES
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core import distill as distill_mod
from sparsekd_deploy.core.distill import distill
from sparsekd_deploy.core.patterns import NM
from sparsekd_deploy.errors import ConfigError, OutputExistsError, PatternError, TeacherNotFoundError

# Seeded golden values (CPU, fp32, fast_cfg): [(KL after the prune, kept KL)] per stage.
GOLDEN = {
    "llama-2:4": [(0.018417, 0.015461), (0.034133, 0.028330)],
    "llama-2:4-best-step": [4, 4],  # both stages keep their last checkpoint
    "opt-2:4": [(0.014536, 0.010911), (0.023641, 0.018054)],
    # black-box teacher (its samples as targets): training never beat either stage's post-prune state, which is kept
    "qwen2-text": [(0.025859, 0.025859), (0.040105, 0.040105)],
    "llama-data-dir": [(0.021421, 0.017184), (0.033216, 0.027856)],
}


def _cfg(fast_cfg, teacher, **kw):
    return build_config(None, {**fast_cfg, "teacher": str(teacher), **kw})


def _kls(res):
    """(KL right after the prune, held-out KL kept) of each stage: seeded golden values pin these."""
    return [(s["kl_after_prune"], s["kl"]) for s in res.trajectory[1:]]


def _golden(res, expected):
    got = [kl for pair in _kls(res) for kl in pair]
    assert got == pytest.approx([kl for pair in expected for kl in pair], rel=2e-3, abs=1e-6)


def test_seeded_golden_kl(tiny_dirs, fast_cfg):
    """A small 2:4 run on the tiny Llama, seed 0: each stage's post-prune and kept held-out KL. The kept KL is never
    above the post-prune one (the post-prune state is a recovery candidate)."""
    res = distill(_cfg(fast_cfg, tiny_dirs["llama"]))
    assert res.reached_target
    _golden(res, GOLDEN["llama-2:4"])
    assert all(kept <= after for after, kept in _kls(res))
    assert [s["best_step"] for s in res.trajectory[1:]] == GOLDEN["llama-2:4-best-step"]


@pytest.mark.parametrize("family", FAMILIES)
def test_24_end_to_end_every_family(family, tiny_dirs, fast_cfg):
    res = distill(_cfg(fast_cfg, tiny_dirs[family]))
    assert res.status == "complete" and res.reached_target
    out = res.out
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    sp = json.loads((out / "sparsity.json").read_text())
    assert sp["overall_sparsity"] == pytest.approx(0.5)
    assert sp["pruned_weights_verified_zero"] > 0
    # every pruned layer of the reloaded student really is 2:4 on its input-features axis
    from sparsekd_deploy.models.adapters import prunable_layers

    layers = {ly.name: ly for ly in prunable_layers(student)}
    for name, entry in sp["layers"].items():
        assert entry["pattern_holds"]
        assert NM(2, 4).holds(layers[name].weight_oi().detach())
    traj = json.loads((out / "trajectory.json").read_text())
    # The default cubic schedule: 1 - (1 - 1/2)^3 = 87.5 % of the 2:4 zeros after stage 1, all after stage 2.
    assert [s["label"] for s in traj["stages"]] == ["dense", "2:4@88%", "2:4"]
    assert [s["sparsity"] for s in traj["stages"]] == pytest.approx([0.0, 0.4375, 0.5])
    for s in traj["stages"][1:]:
        assert s["accepted"] and s["kl"] >= 0 and 0 <= s["top1"] <= 1
        assert set(s["consistency"]["student"]["1"]) == {"pairwise_agreement@2", "modal_share@2", "distinct_2", "mean_entropy"}
    assert (out / "trajectory.png").stat().st_size > 10_000
    assert not (out.parent / "run.partial").exists()


def test_unstructured_and_structured(tiny_dirs, fast_cfg, tmp_path):
    res = distill(_cfg(fast_cfg, tiny_dirs["llama"], pattern="unstructured:0.5", importance="taylor"))
    assert res.summary["sparsity"] == pytest.approx(0.5, abs=0.01)
    res = distill(_cfg(fast_cfg, tiny_dirs["gpt2"], pattern="channels:0.25", out=str(tmp_path / "ch")))
    student = AutoModelForCausalLM.from_pretrained(res.out / "student")
    assert student.config.n_inner == 48
    assert res.summary["parameters"]["student"] < res.summary["parameters"]["teacher"]


def test_masks_enforced_after_every_step(tiny_dirs, fast_cfg, monkeypatch):
    from conftest import masks_bind_after_each_training_segment

    seen = masks_bind_after_each_training_segment(monkeypatch)
    distill(_cfg(fast_cfg, tiny_dirs["llama"], lr=0.05))
    assert seen == [True] * 8  # 2 stages × 4 training segments (held-out KL is measured after each)


def test_stage_over_budget_stops_at_last_accepted(tiny_dirs, fast_cfg):
    res = distill(_cfg(fast_cfg, tiny_dirs["llama"], kl_budget=1e-9, retries=1))
    assert res.status == "stopped" and not res.reached_target
    assert "above the KL budget" in res.reason
    traj = res.trajectory
    assert traj[-1]["accepted"] is False and traj[-1]["attempts"] == 2 and traj[-1]["steps"] == 4 + 8
    # nothing accepted beyond dense: the saved student is the dense teacher
    s = load_file(str(res.out / "student" / "model.safetensors"))
    t = load_file(str(tiny_dirs["llama"] / "model.safetensors"))
    assert all(torch.equal(s[k], t[k]) for k in t)
    assert res.summary["final_stage"] == 0


def test_non_finite_loss_stops_and_keeps_last_stage(tiny_dirs, fast_cfg, monkeypatch):
    calls = {"n": 0}
    orig = distill_mod.StagedDistiller.loss_on

    def poisoned(self, ids, rows=None):
        calls["n"] += 1
        loss = orig(self, ids, rows)
        return loss * float("nan") if calls["n"] > 6 else loss  # stage 1 trains fine, stage 2 blows up

    monkeypatch.setattr(distill_mod.StagedDistiller, "loss_on", poisoned)
    res = distill(_cfg(fast_cfg, tiny_dirs["llama"], importance="magnitude"))
    assert res.status == "stopped" and "non-finite loss" in res.reason
    assert res.summary["final_stage"] == 1
    assert json.loads((res.out / "sparsity.json").read_text())["overall_sparsity"] == pytest.approx(0.4375)  # stage 1 of the cubic default


def test_resume_continues_from_last_accepted(tiny_dirs, fast_cfg, monkeypatch):
    cfg = _cfg(fast_cfg, tiny_dirs["llama"], stages=3)
    orig = distill_mod.StagedDistiller.train_steps

    def killed_in_stage_3(self, gen, start, stop, total, peak_lr, stage_label):
        if stage_label == "2:4":  # the last of 2:4@70%, 2:4@96%, 2:4
            raise KeyboardInterrupt
        orig(self, gen, start, stop, total, peak_lr, stage_label)

    monkeypatch.setattr(distill_mod.StagedDistiller, "train_steps", killed_in_stage_3)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg)
    from sparsekd_deploy.core.rundir import RunDir

    rd = RunDir(cfg.out)
    assert rd.partial.is_dir() and not rd.final.exists()
    assert json.loads((rd.partial / "state.json").read_text())["accepted"] == 2
    with pytest.raises(OutputExistsError, match="--resume"):
        distill(cfg)
    monkeypatch.setattr(distill_mod.StagedDistiller, "train_steps", orig)
    with pytest.raises(ConfigError, match=r"was started with lr=0.0005, seed=0, you passed lr=0.001, seed=3; "
                                          r"rerun with the same flags or drop --resume"):
        distill(_cfg(fast_cfg, tiny_dirs["llama"], stages=3, lr=1e-3, seed=3), resume=True)
    assert json.loads((rd.partial / "state.json").read_text())["accepted"] == 2  # the refusal touched nothing
    # A damaged or missing checkpoint is one line (it was safetensors' traceback), or, without a weight file, a
    # "restore" that silently kept the teacher's weights under stage 2's masks.
    weights = rd.checkpoint_dir(2) / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:100])
    with pytest.raises(OutputExistsError, match=r"cannot be resumed: checkpoint checkpoints/stage-2 \(accepted stage 2\) "
                                                r"is missing or damaged \(.*\); pass --overwrite to start the run over$"):
        distill(cfg, resume=True)
    weights.unlink()
    with pytest.raises(OutputExistsError, match=r"checkpoint checkpoints/stage-2 \(accepted stage 2\) is missing or "
                                                r"damaged \(no weight files in it\); pass --overwrite"):
        distill(cfg, resume=True)
    weights.write_bytes(whole)
    # The state.json as the version before --teacher-precision wrote it (the shares filled in at 0.5 with their
    # feature off, no teacher_precision): the same flags resume it (they were refused as changed shares before).
    state = json.loads((rd.partial / "state.json").read_text())
    older = {k: v for k, v in state["config"].items() if k != "teacher_precision"}
    state["config"] = older | {"mask_learning_share": 0.5, "demolition_share": 0.5}
    (rd.partial / "state.json").write_text(json.dumps(state))
    res = distill(cfg, resume=True)
    assert res.reached_target and [s["stage"] for s in res.trajectory] == [0, 1, 2, 3]
    assert res.summary["sparsity"] == pytest.approx(0.5)
    assert res.trajectory[3]["teacher_precision"] == "fp32"
    # The adopted fp32 is not written as a flag: a later resume of such a run adopts it again at the default auto.
    assert "teacher_precision" not in json.loads((res.out / "state.json").read_text())["config"]


def test_resume_of_a_run_older_than_teacher_precision_keeps_its_fp32_teacher(tmp_path):
    """A state.json written before --teacher-precision existed: the run held its teacher in fp32 throughout. Resumed
    at the default auto it adopts fp32 (on a GPU auto would switch to 16 bits mid-run); fp32 passed is the same
    setting; bf16 passed is refused like any changed flag."""
    from sparsekd_deploy.core.rundir import RunDir, check_resume_config
    from sparsekd_deploy.pipeline.build import _differing_flags

    now = build_config(None, {"out": str(tmp_path / "run")}).to_dict()
    older = {k: v for k, v in now.items() if k != "teacher_precision"} | {"mask_learning_share": 0.5,
                                                                          "demolition_share": 0.5}
    rd = RunDir(tmp_path / "run")
    rd.partial.mkdir()
    (rd.partial / "state.json").write_text(json.dumps({"config": older, "accepted": 1}))
    assert check_resume_config(rd, now) == {"teacher_precision": "fp32"}
    assert check_resume_config(rd, now | {"teacher_precision": "fp32"}) == {}
    with pytest.raises(ConfigError, match=r"was started with teacher_precision=fp32, you passed teacher_precision=bf16"):
        check_resume_config(rd, now | {"teacher_precision": "bf16"})
    # Shares the older version left at 0.5 with their feature on were spent: another value is a changed flag.
    (rd.partial / "state.json").write_text(json.dumps({"config": older | {"demolition": "gradual"}, "accepted": 1}))
    with pytest.raises(ConfigError, match=r"was started with demolition_share=0.5, you passed demolition_share=0.3"):
        check_resume_config(rd, now | {"demolition": "gradual", "demolition_share": 0.3})
    # A rebuild that finds such a finished run reuses it with the same flags (it named the shares as changed before).
    assert _differing_flags(rd.partial / "state.json", build_config(None, {"out": str(tmp_path / "run"),
                                                                         "demolition": "gradual"})) == ""


def test_output_dir_rules(tiny_dirs, fast_cfg):
    cfg = _cfg(fast_cfg, tiny_dirs["opt"])
    distill(cfg)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        distill(cfg)
    marker = (cfg.out + "/student/config.json")
    before = open(marker).read()
    res = distill(cfg, overwrite=True)
    assert res.reached_target and open(marker).read() == before
    _golden(res, GOLDEN["opt-2:4"])


def test_bad_inputs(tiny_dirs, fast_cfg, tmp_path):
    with pytest.raises(TeacherNotFoundError, match="does not exist"):
        distill(_cfg(fast_cfg, tmp_path / "nope"))
    with pytest.raises(TeacherNotFoundError, match="Hub id"):
        distill(_cfg(fast_cfg, "meta-llama/Llama-3-8B"))
    with pytest.raises(PatternError, match="fits no layer"):
        distill(_cfg(fast_cfg, tiny_dirs["llama"], pattern="2:3"))
    from sparsekd_deploy.errors import DataError

    short = tmp_path / "short.txt"
    short.write_text("hello")
    with pytest.raises(DataError, match="need at least"):
        distill(_cfg(fast_cfg, tiny_dirs["llama"], data=str(short)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        distill(_cfg(fast_cfg, tiny_dirs["llama"], data=str(empty)))
    assert not (tmp_path / "run.partial").exists() and not (tmp_path / "run").exists()


def test_text_data_and_text_access(tiny_dirs, fast_cfg, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 400)
    res = distill(_cfg(fast_cfg, tiny_dirs["qwen2"], data=str(data), teacher_access="text"))
    assert res.reached_target
    _golden(res, GOLDEN["qwen2-text"])


def test_pickled_weights_refused_and_dir_checks(tmp_path, fast_cfg, tiny_dirs):
    import shutil

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_dirs["llama"] / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(TeacherNotFoundError, match="pickled .bin/.pt files are refused"):
        distill(_cfg(fast_cfg, d))
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(TeacherNotFoundError, match="no config.json"):
        distill(_cfg(fast_cfg, tmp_path / "nocfg"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(TeacherNotFoundError, match="is a file"):
        distill(_cfg(fast_cfg, tmp_path / "file.txt"))


def test_data_dir_of_text_files(tiny_dirs, fast_cfg, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(f"document {i} says hello world. " * 150)
    res = distill(_cfg(fast_cfg, tiny_dirs["llama"], data=str(d)))
    assert res.reached_target
    _golden(res, GOLDEN["llama-data-dir"])
    (tmp_path / "empty").mkdir()
    from sparsekd_deploy.errors import DataError

    with pytest.raises(DataError, match="no \\*.txt files"):
        distill(_cfg(fast_cfg, tiny_dirs["llama"], data=str(tmp_path / "empty"), out=str(tmp_path / "o2")))


def test_teacher_precision_bf16_holds_only_the_training_teacher_in_bf16(tiny_dirs, fast_cfg, monkeypatch):
    from sparsekd_deploy.core import stage_training

    seen = []
    orig = stage_training.heldout_metrics

    def spy(teacher, student, *a, **kw):
        seen.append((next(teacher.parameters()).dtype, next(student.parameters()).dtype))
        return orig(teacher, student, *a, **kw)

    monkeypatch.setattr(stage_training, "heldout_metrics", spy)
    stopped = distill(_cfg(fast_cfg, tiny_dirs["llama"], teacher_precision="bf16", kl_budget=1e-9))
    assert seen and set(seen) == {(torch.bfloat16, torch.float32)}  # every held-out pass: bf16 teacher, fp32 student
    assert stopped.trajectory[1]["teacher_precision"] == "bf16"
    # Over budget → back to stage 0, whose weights are the teacher's fp32 ones read from disk, not the bf16 copy.
    assert stopped.summary["final_stage"] == 0
    s = load_file(str(stopped.out / "student" / "model.safetensors"))
    t = load_file(str(tiny_dirs["llama"] / "model.safetensors"))
    assert all(s[k].dtype == torch.float32 and torch.equal(s[k], t[k]) for k in t)

    monkeypatch.setattr(stage_training, "heldout_metrics", orig)
    bf16 = distill(_cfg(fast_cfg, tiny_dirs["llama"], teacher_precision="bf16", out=str(stopped.out.parent / "bf16")))
    auto = distill(_cfg(fast_cfg, tiny_dirs["llama"], out=str(stopped.out.parent / "auto")))  # fp32 on a CPU
    assert auto.trajectory[1]["teacher_precision"] == "fp32"
    # The data were sampled by the fp32 teacher in both runs: the same sequences.
    data = [load_file(str(r.out / "data.safetensors")) for r in (bf16, auto)]
    assert torch.equal(data[0]["train"], data[1]["train"]) and torch.equal(data[0]["heldout"], data[1]["heldout"])
    # Seeded golden values; the fp32 run's differ in the 4th digit (0.018417, 0.015461, 0.034133, 0.028330).
    _golden(bf16, [(0.018406, 0.015457), (0.034140, 0.028303)])
    _golden(auto, GOLDEN["llama-2:4"])  # auto on a CPU computes what the run did before --teacher-precision
    assert _kls(bf16) != _kls(auto)


def test_teacher_precision_with_a_topk_cache_is_refused():
    with pytest.raises(ConfigError, match="freed once it wrote its top-K cache"):
        build_config(None, {"teacher_access": "topk:8", "teacher_precision": "bf16"})
