"""Load paths inside a run (--allocation loadpath, --dense-layers) and the auto search (unstructured:auto), on the
tiny models; plus their bad inputs."""

import json
import os

import pytest
import torch

from sparsekd_deploy.config import build_config
from sparsekd_deploy.core.distill import distill
from sparsekd_deploy.core.result import NullReporter
from sparsekd_deploy.errors import ConfigError, SparseKDError


def _cfg(fast_cfg, teacher, **kw):
    return build_config(None, {**fast_cfg, "teacher": str(teacher), **kw})


def test_loadpath_allocation_gives_layers_their_own_sparsity_at_the_global_target(tiny_dirs, fast_cfg):
    res = distill(_cfg(fast_cfg, tiny_dirs["llama"], pattern="unstructured:0.5", allocation="loadpath"))
    assert res.reached_target
    last = res.trajectory[-1]
    per_layer = last["layer_sparsity"]
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # not uniform
    assert res.summary["sparsity"] == pytest.approx(0.5, abs=0.01)  # the same global sparsity
    loads = {ly["name"]: ly["kl"] for ly in json.loads((res.out / "loadpaths.json").read_text())["layers"]}
    heaviest, lightest = max(loads, key=loads.get), min(loads, key=loads.get)
    assert per_layer[heaviest] < per_layer[lightest]  # less removed where the load is


def test_dense_layers_keep_the_most_load_bearing_layers_dense(tiny_dirs, fast_cfg):
    res = distill(_cfg(fast_cfg, tiny_dirs["llama"], pattern="2:4", dense_layers="2"))
    assert res.reached_target
    sp = json.loads((res.out / "sparsity.json").read_text())
    kept = {name: why for name, why in sp["skipped"].items() if "load path" in why}
    loads = sorted(json.loads((res.out / "loadpaths.json").read_text())["layers"], key=lambda ly: -ly["kl"])
    assert set(kept) == {loads[0]["name"], loads[1]["name"]}
    assert all(e["pattern_holds"] for e in sp["layers"].values())  # every other layer is 2:4


def test_auto_prunes_until_the_budget_would_break(tiny_dirs, fast_cfg):
    res = distill(_cfg(fast_cfg, tiny_dirs["llama"], pattern="unstructured:auto", kl_budget=0.05, retries=0))
    assert res.reached_target and res.reason.startswith("reached unstructured")
    stages = res.trajectory[1:]
    accepted = [s for s in stages if s["accepted"]]
    rejected = [s for s in stages if not s["accepted"]]
    assert accepted and rejected  # it went as far as the budget allowed, and one step further was refused
    assert all(s["kl"] <= 0.05 for s in accepted) and all(s["kl"] > 0.05 for s in rejected)
    targets = [s["target_sparsity"] for s in accepted]
    assert targets == sorted(targets)
    assert res.summary["sparsity"] == pytest.approx(targets[-1], abs=0.01)  # the sparsest accepted student
    # after a rejected target, the next one tried is a smaller step from the last accepted
    first_bad = stages.index(rejected[0])
    assert stages[first_bad + 1]["target_sparsity"] < rejected[0]["target_sparsity"]
    assert GOLDEN_AUTO_SPARSITY == pytest.approx(res.summary["sparsity"], abs=0.01)


GOLDEN_AUTO_SPARSITY = 0.75  # seed 0, tiny Llama, fast_cfg


def test_a_resumed_auto_search_continues_where_it_stopped():
    """Replaying the recorded attempts up to any accepted stage (what --resume reads from state.json) leaves the search
    as the live one was there: same attempts, sparsity, step and last rejection, so the same next target. A resume
    once replayed only the accepted stages and went back to the first step (20 %) after a rejection."""
    from sparsekd_deploy.core.auto_search import AutoSearch

    def kl_at(sparsity):  # KL over budget 0.05 above 72 % sparsity: 80 % is rejected, then 70 % accepted
        return 0.05 * (sparsity / 0.72) ** 2

    live, trajectory, states = AutoSearch.for_spec("unstructured:auto", 2), [{"stage": 0, "accepted": True}], {}
    while (nxt := live.next_stage(4)) is not None:
        stage, pattern = nxt
        s, kl = pattern.target_sparsity(), kl_at(pattern.target_sparsity())
        ok = kl <= 0.05
        trajectory.append({"stage": stage.index, "accepted": ok, "target_sparsity": s, "kl": kl, "kl_after_prune": kl})
        live.accept(s) if ok else live.reject(s, kl)
        if ok:
            states[stage.index] = (len(trajectory), AutoSearch(**vars(live)))
    assert [(r["target_sparsity"], r["accepted"]) for r in trajectory[1:6]] == [
        (0.2, True), (0.4, True), (0.6, True), (0.8, False), (0.7, True)]
    for n, expected in states.values():
        resumed = AutoSearch.for_spec("unstructured:auto", 2)
        resumed.replay(trajectory[:n])
        assert vars(resumed) == vars(expected)
    resumed = AutoSearch.for_spec("unstructured:auto", 2)
    resumed.replay(trajectory[:6])  # after 0.8 was rejected and 0.7 accepted: the step is halved, not back at 20 %
    assert resumed.step == pytest.approx(0.1) and resumed.next_stage(4)[1].target_sparsity() == pytest.approx(0.8)


class _KillAfterFirstRejection(NullReporter):
    """Records the stages begun; with ``kill``, stops the run (KeyboardInterrupt, as Ctrl-C or a kill would) when the
    attempt after the first rejected one begins: after the rejection, before the next accepted stage."""

    def __init__(self, kill: bool):
        self.kill, self.begun, self.rejected = kill, [], False

    def stage_begin(self, label: str, steps: int) -> None:
        if self.kill and self.rejected:
            raise KeyboardInterrupt
        self.begun.append(label)

    def stage_end(self, record: dict) -> None:
        self.rejected = self.rejected or not record["accepted"]


def test_an_auto_run_killed_after_a_rejected_stage_resumes_at_the_next_attempt(tiny_dirs, fast_cfg, tmp_path):
    """Killed after a rejected auto stage and before the next accepted one, `--resume` repeated the rejected stage
    (state.json was written only when a stage was accepted, so the rejection was lost): the same result, its compute
    spent twice. It must begin at the next attempt and end with the uninterrupted run's masks and KLs."""
    from safetensors.torch import load_file

    kw = dict(pattern="unstructured:auto", kl_budget=0.05, retries=0)
    whole = distill(_cfg(fast_cfg, tiny_dirs["llama"], out=str(tmp_path / "whole"), **kw))
    stages = whole.trajectory[1:]
    first_bad = next(i for i, s in enumerate(stages) if not s["accepted"])
    killer = _KillAfterFirstRejection(kill=True)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        distill(_cfg(fast_cfg, tiny_dirs["llama"], out=str(out), **kw), reporter=killer)
    assert killer.begun == [s["label"] for s in stages[: first_bad + 1]]
    again = _KillAfterFirstRejection(kill=False)
    resumed = distill(_cfg(fast_cfg, tiny_dirs["llama"], out=str(out), **kw), resume=True, reporter=again)
    assert again.begun == [s["label"] for s in stages[first_bad + 1:]]  # the rejected attempt is not run again
    assert [(s["target_sparsity"], s["accepted"]) for s in resumed.trajectory[1:]] == \
        [(s["target_sparsity"], s["accepted"]) for s in stages]
    for key in ("kl_after_prune", "kl"):
        assert [s[key] for s in resumed.trajectory[1:]] == pytest.approx([s[key] for s in stages], abs=1e-7), key
    last = resumed.summary["final_stage"]
    assert last == whole.summary["final_stage"]
    ma, mb = (load_file(str(r.out / "checkpoints" / f"stage-{last}" / "masks.safetensors")) for r in (whole, resumed))
    assert sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("overrides,message", [
    ({"pattern": "2:4:auto"}, "pattern"),
    ({"pattern": "nm:auto"}, "only unstructured:auto and channels:auto"),
    ({"pattern": "2:4", "allocation": "loadpath"}, "use dense_layers"),
    ({"pattern": "channels:0.5", "allocation": "loadpath"}, "same channel count"),
    ({"pattern": "unstructured:0.5", "dense_layers": "2"}, "dense_layers is for n:m"),
    ({"pattern": "2:4", "dense_layers": "many"}, "count ≥ 0 or auto"),
    ({"pattern": "unstructured:auto", "allocation": "loadpath"}, "takes no allocation"),
    ({"loadpaths": "/nonexistent/loadpaths.json", "pattern": "2:4", "dense_layers": "1"}, "does not exist"),
])
def test_bad_load_path_and_auto_inputs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, overrides)


def test_data_free_run_on_a_teacher_without_tokenizer(tiny_dirs, fast_cfg, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for f in tiny_dirs["llama"].iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(f, teacher / f.name)
    res = distill(_cfg(fast_cfg, teacher, stages=1))
    assert res.reached_target and (res.out / "student" / "model.safetensors").is_file()


def test_a_second_run_into_a_live_runs_output_is_refused(tiny_dirs, fast_cfg):
    from sparsekd_deploy.locks import dir_lock

    cfg = _cfg(fast_cfg, tiny_dirs["llama"], stages=1)
    with dir_lock(cfg.out):  # this process holds it, as a running distill would
        with pytest.raises(SparseKDError, match=f"pid {os.getpid()}"):
            distill(cfg, overwrite=True)


def test_dense_layers_with_a_speed_profile_say_what_each_costs(tiny_dirs, fast_cfg, tmp_path):
    from sparsekd_deploy.core.patterns import NM
    from sparsekd_deploy.core.pruner import Pruner
    from sparsekd_deploy.models.loading import load_model

    names = [ly.name for ly in Pruner(load_model(tiny_dirs["llama"]), NM(2, 4)).layers]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": "H200", "target": "torch", "tokens": 4096,
                                   "layers": {n: {"speedup": 1.3} for n in names}}))
    res = distill(_cfg(fast_cfg, tiny_dirs["llama"], pattern="2:4", dense_layers="2",
                       sparsify_only_faster=str(profile)))
    kept = {n: why for n, why in json.loads((res.out / "sparsity.json").read_text())["skipped"].items()}
    assert len(kept) == 2
    assert all("load path" in why and "forgoes its measured 2:4 speedup of 1.30x (H200, torch, 4096 tokens)" in why
               for why in kept.values()), kept
