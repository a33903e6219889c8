"""Load-path analysis (core/loadpaths.py), allocation by load path (core/allocation.py) and `sparsekd-deploy analyze`."""

import json

import pytest
import torch
from click.testing import CliRunner

from sparsekd_deploy.cli import main
from sparsekd_deploy.core.allocation import (
    AllocationError,
    allocate,
    allocated_masks,
    dense_layers,
    dense_reasons,
    global_sparsity_of,
)
from sparsekd_deploy.core.evaluate import heldout_metrics
from sparsekd_deploy.core.loadpaths import (
    LayerLoad,
    LoadPathError,
    LoadPathReport,
    analyze,
    analyze_model,
    layer_kinds,
    load_report,
    write_report,
)
from sparsekd_deploy.core.patterns import make_pattern
from sparsekd_deploy.core.pruner import Pruner
from sparsekd_deploy.core.teacher import sample_teacher_data
from sparsekd_deploy.digests import weights_digest
from sparsekd_deploy.errors import DataError
from sparsekd_deploy.models.loading import load_model

SMALL = dict(seq_len=16, calib_samples=4, heldout_samples=4, batch_size=4, seed=0)
CLI_SMALL = ["--seq-len", "16", "--calib-samples", "4", "--heldout-samples", "4", "--batch-size", "4"]


@pytest.fixture(scope="module")
def llama_report(tiny_dirs):
    return analyze(tiny_dirs["llama"], "unstructured:0.7", **SMALL)


def synthetic(kls, params=None, pattern="unstructured:0.5") -> LoadPathReport:
    params = params or [1000] * len(kls)
    layers = [LayerLoad(f"m.layers.{i}.proj", "proj", i, p, kl, 0.9, 0.5, 0.0, 1.0)
              for i, (kl, p) in enumerate(zip(kls, params, strict=True))]
    return LoadPathReport("t", "d" * 64, make_pattern(pattern).spec, "wanda", 5.0, {}, layers)


# -- analysis -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,pattern", [("llama", "unstructured:0.7"), ("gpt2", "channels:0.5"), ("opt", "2:4")])
def test_single_layer_kl_is_positive_and_the_teacher_is_unchanged(tiny_dirs, family, pattern):
    model = load_model(tiny_dirs[family])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = sample_teacher_data(model, None, 8, 16, 0)
    report = analyze_model(model, pattern, ids[:4], ids[4:], batch_size=4)
    assert report.layers and all(ly.kl > 0 for ly in report.layers)
    assert all(0 <= ly.outlier_ratio < 1 and ly.mean_score > 0 for ly in report.layers)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "analysis left a layer pruned"


def test_single_layer_kl_is_the_kl_of_that_layer_pruned_alone(tiny_dirs):
    """Cross-check against the distiller's own measurement: prune the layer by hand, measure with heldout_metrics."""
    model = load_model(tiny_dirs["llama"])
    ids = sample_teacher_data(model, None, 8, 16, 0)
    report = analyze_model(model, "unstructured:0.7", ids[:4], ids[4:], batch_size=4)
    name = "model.layers.1.mlp.down_proj"
    student = load_model(tiny_dirs["llama"])
    pruner = Pruner(student, make_pattern("unstructured:0.7"))
    layer = next(ly for ly in pruner.layers if ly.name == name)
    from sparsekd_deploy.core.importance import ScoringContext, score

    scores = score("wanda", ScoringContext(student, pruner.layers, list(ids[:4].split(4))))
    with torch.no_grad():
        layer.module.weight.mul_(layer.to_native(make_pattern("unstructured:0.7").keep_mask(scores[name], 1.0)))
    expected = heldout_metrics(model, student, ids[4:], 4, "cpu")
    got = report.by_name()[name]
    assert got.kl == pytest.approx(expected["kl"], rel=1e-5)
    assert got.top1 == pytest.approx(expected["top1"])
    assert got.sparsity == pytest.approx(0.7, abs=1e-3)


def test_golden_single_layer_kl(llama_report):
    """Seeded: data-free samples (seed 0, 4 + 4 × 16 tokens), wanda, unstructured:0.7 on the tiny llama."""
    assert llama_report.by_name()["model.layers.0.self_attn.o_proj"].kl == pytest.approx(0.033749, rel=1e-3)
    assert llama_report.ranked()[0].name == "model.layers.0.self_attn.o_proj"
    assert len(llama_report.layers) == 14  # 2 blocks × q k v o gate up down


def test_layer_kinds():
    kinds = layer_kinds(["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                         "transformer.h.0.mlp.c_proj", "model.layers.3.self_attn.q_proj", "lm_head"])
    assert kinds["transformer.h.0.attn.c_proj"] == (0, "attn.c_proj")
    assert kinds["transformer.h.0.mlp.c_proj"] == (0, "mlp.c_proj")
    assert kinds["transformer.h.0.mlp.c_fc"] == (0, "c_fc")
    assert kinds["model.layers.3.self_attn.q_proj"] == (3, "q_proj")
    assert kinds["lm_head"] == (None, "lm_head")


def test_report_round_trips_and_is_refused_for_another_teacher_or_pattern(llama_report, tiny_dirs, tmp_path):
    paths = write_report(llama_report, tmp_path / "a")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = load_report(paths["json"], tiny_dirs["llama"], "unstructured:0.7")
    assert back == llama_report and back.weights_digest == weights_digest(tiny_dirs["llama"])
    with pytest.raises(LoadPathError, match=r"made from teacher .*llama.* not from teacher .*qwen2"):
        load_report(paths["json"], tiny_dirs["qwen2"])
    with pytest.raises(LoadPathError, match=r"measured pattern unstructured:0\.7, but this run prunes to 2:4"):
        load_report(paths["json"], tiny_dirs["llama"], "2:4")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(LoadPathError, match="not a loadpaths.json"):
        load_report(tmp_path / "bad.json", tiny_dirs["llama"])


# -- allocation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target,lo,hi", [(0.7, 0.5, 0.9), (0.5, 0.0, 0.95), (0.8, 0.7, 0.85)])
def test_allocation_hits_the_global_target_within_bounds(llama_report, target, lo, hi):
    alloc = allocate(llama_report, target, lo, hi)
    assert set(alloc) == {ly.name for ly in llama_report.layers}
    assert global_sparsity_of(llama_report, alloc) == pytest.approx(target, abs=1e-3)
    assert all(lo - 1e-12 <= s <= hi + 1e-12 for s in alloc.values())
    assert max(alloc.values()) - min(alloc.values()) > 0.01  # not the uniform allocation


def test_allocation_weights_by_parameter_count():
    report = synthetic([0.01, 0.01], params=[1000, 3000])
    alloc = allocate(report, 0.5, 0.1, 0.9)
    assert (1000 * alloc["m.layers.0.proj"] + 3000 * alloc["m.layers.1.proj"]) / 4000 == pytest.approx(0.5, abs=1e-6)
    assert alloc["m.layers.1.proj"] > alloc["m.layers.0.proj"]  # same load, more weights: gives more


def test_higher_load_gets_lower_sparsity(llama_report):
    report = synthetic([0.5, 0.001, 0.05, 0.02, 0.2, 0.01])
    alloc = allocate(report, 0.6, 0.3, 0.9, strength=0.5)
    by_load = [alloc[ly.name] for ly in report.ranked()]
    assert by_load == sorted(by_load) and by_load[0] < by_load[-1] - 0.1
    # On the real report, among layers of one size: the heaviest is pruned less than the lightest.
    same = [ly for ly in llama_report.ranked() if ly.params == llama_report.ranked()[0].params]
    alloc = allocate(llama_report, 0.7, 0.5, 0.9)
    assert alloc[same[0].name] < alloc[same[-1].name]


@pytest.mark.parametrize("target,lo,hi,needle", [
    (0.7, 0.1, 0.6, r"reach a global sparsity of 0\.1000\.\.0\.6000 only, not 0\.7"),
    (0.3, 0.4, 0.9, r"0\.4000\.\.0\.9000 only, not 0\.3"),
    (0.5, 0.6, 0.4, "0 ≤ min ≤ max < 1"),
])
def test_impossible_bounds_raise(target, lo, hi, needle):
    with pytest.raises(AllocationError, match=needle):
        allocate(synthetic([0.1, 0.2, 0.3]), target, lo, hi)


def test_per_layer_bounds_and_nm_refused():
    report = synthetic([0.1, 0.2, 0.3])
    alloc = allocate(report, 0.5, {"m.layers.2.proj": 0.0}, {"m.layers.2.proj": 0.0})
    assert alloc["m.layers.2.proj"] == 0.0 and global_sparsity_of(report, alloc) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(AllocationError, match="no continuous sparsity"):
        allocate(synthetic([0.1, 0.2], pattern="2:4"), 0.5, 0.0, 0.9)


def test_allocated_masks_give_each_layer_its_sparsity(tiny_dirs, llama_report):
    model = load_model(tiny_dirs["llama"])
    pruner = Pruner(model, make_pattern("unstructured:0.7"))
    scores = {ly.name: ly.weight_oi().detach().abs() for ly in pruner.layers}
    alloc = allocate(llama_report, 0.7, 0.5, 0.9)
    masks = allocated_masks(pruner, scores, 1.0, alloc)
    for ly in pruner.layers:
        assert (~masks[ly.param_name]).float().mean().item() == pytest.approx(alloc[ly.name], abs=1.5 / ly.module.weight.numel())
    half = allocated_masks(pruner, scores, 0.5, alloc)  # a stage at half of the pattern
    name = pruner.layers[0].param_name
    assert (~half[name]).float().mean().item() == pytest.approx(0.5 * alloc[pruner.layers[0].name], abs=1e-3)


def test_dense_layers(llama_report):
    ranked = [ly.name for ly in llama_report.ranked()]
    assert dense_layers(llama_report, 3) == ranked[:3]
    assert dense_layers(llama_report, "0") == []
    with pytest.raises(AllocationError, match="pass 0..14 or auto"):
        dense_layers(llama_report, 15)
    report = synthetic([1.0, 0.01, 0.012, 0.011, 0.009, 0.5, 0.01, 0.01])
    assert dense_layers(report, "auto") == ["m.layers.0.proj", "m.layers.5.proj"]  # > 3× the median, ≤ 1/4
    assert dense_layers(synthetic([0.01] * 8), "auto") == []
    capped = synthetic([1.0, 0.9, 0.8, 0.01, 0.01, 0.01, 0.01, 0.01])  # 3 outliers, at most 8 // 4 kept dense
    assert dense_layers(capped, "auto") == ["m.layers.0.proj", "m.layers.1.proj"]
    reasons = dense_reasons(report, ["m.layers.0.proj"])
    assert "load path #1" in reasons["m.layers.0.proj"] and "× the median" in reasons["m.layers.0.proj"]


# -- the command --------------------------------------------------------------------------------------------
def run(args):
    return CliRunner().invoke(main, ["analyze", *args], catch_exceptions=False)


def test_cli_writes_the_files(tiny_dirs, tmp_path):
    out = tmp_path / "an"
    r = run(["--teacher", str(tiny_dirs["gpt2"]), "--pattern", "unstructured:0.5", "--out", str(out), "--json",
             *CLI_SMALL])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["files"]["json"] == str(out / "loadpaths.json") and (out / "loadpaths.png").stat().st_size > 1000
    saved = json.loads((out / "loadpaths.json").read_text())
    assert saved["weights_digest"] == weights_digest(tiny_dirs["gpt2"]) and saved["pattern"] == "unstructured:0.5"
    assert len(saved["layers"]) == 8 and saved["ranking"][0] == max(saved["layers"], key=lambda x: x["kl"])["name"]
    r = run(["--teacher", str(tiny_dirs["gpt2"]), "--pattern", "unstructured:0.5", "--out", str(out), *CLI_SMALL])
    assert r.exit_code == 0 and "load paths at unstructured:0.5" in r.output


@pytest.mark.parametrize("args,needle", [
    (["--include", "nothing_matches"], "no prunable layer"),
    (["--teacher", "/definitely/missing"], "does not exist"),
    (["--out", "FILE/sub"], "not writable"),
    (["--out", "FILE"], "is a file"),
    (["--pattern", "unstructured:2"], "0 < S < 1"),
])
def test_bad_input_is_one_line_exit_2(tiny_dirs, tmp_path, args, needle):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / a) if a.startswith("FILE") else a for a in args]
    base = [] if "--teacher" in args else ["--teacher", str(tiny_dirs["llama"])]
    base += [] if "--out" in args else ["--out", str(tmp_path / "o")]
    r = run([*base, *args, *CLI_SMALL])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o" / "loadpaths.json").exists()


def test_analysis_on_text_data(tiny_dirs, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 400)
    report = analyze(tiny_dirs["llama"], "2:4", data=text, seq_len=16, calib_samples=4, heldout_samples=4,
                     batch_size=4)
    assert report.data["source"] == str(text) and report.data["heldout"] == 4 and report.data["calib"] == 4
    assert all(ly.kl > 0 and ly.sparsity == pytest.approx(0.5) for ly in report.layers)
    (tmp_path / "short.txt").write_text("hello")
    with pytest.raises(DataError, match="at least 2"):
        analyze(tiny_dirs["llama"], "2:4", data=tmp_path / "short.txt", seq_len=16)
