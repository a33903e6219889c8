"""Stability measurements (issue 11): jitter with bootstrap intervals, sensitivity to prompt edits, low confidence and
calibration — golden values of the pieces, the gates, the shared-cache sampling, and the CLI on new and old bundles."""

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST, LOOSE

from sparsekd_deploy import numerics as N
from sparsekd_deploy.core import consistency
from sparsekd_deploy.core import stability as S
from sparsekd_deploy.core.edits import (
    EDITS,
    double_space,
    edit_prompt,
    edited_prompts,
    first_letter_case,
    leading_space,
    token_split,
    trailing_punctuation,
)
from sparsekd_deploy.validate.gate import Gates, evaluate, skipped_gates

# -- golden values of the pieces ---------------------------------------------------------------------------------


def test_bootstrap_interval_golden_and_paired():
    v = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.5, 0.9, 0.3])
    # seeded: resamples of the 8 units with numpy's default_rng(0), 2000 of them, 2.5 / 97.5 % percentiles
    assert N.bootstrap_interval(lambda i: v[i].mean(), len(v), 2000, 0, method="percentile") == pytest.approx(
        (0.275, 0.63125))
    # the default is BCa (the same resamples, levels shifted by the bias correction and the jackknife acceleration)
    assert N.bootstrap_interval(lambda i: v[i].mean(), len(v), 2000, 0) == pytest.approx((0.28125, 0.64375))
    assert S.interval(v) == pytest.approx({"value": 0.44375, "low": 0.28125, "high": 0.64375})
    assert N.bootstrap_interval(lambda i: np.full(5, 0.3)[i].mean(), 5) == pytest.approx((0.3, 0.3))
    # paired: the same prompts are resampled for both sides, so a student that is the teacher scaled by ½ on every
    # prompt has the ratio 0.5 in every resample (an unpaired interval would be wide)
    assert S.ratio_interval(v / 2, v) == pytest.approx({"value": 0.5, "low": 0.5, "high": 0.5})
    assert S.ratio_interval([0.2, 0.4, 0.5, 0.1], [0.4, 0.4, 0.5, 0.2]) == pytest.approx(
        {"value": 0.8, "low": 0.5, "high": 1.0})


# scipy.stats.bootstrap(method="BCa", paired=True, n_resamples=1_000_000) on these data (scipy 1.17.1, two seeds
# agreeing to 5e-5): the reference the BCa implementation is checked against (scipy is not a dependency).
BCA_S = [0.262, 0.265, 0.299, 0.293, 0.214, 0.493, 0.368, 0.226, 0.095, 0.072, 0.064, 0.486, 0.333, 0.061, 0.679, 0.207]
BCA_T = [0.334, 0.267, 0.229, 0.349, 0.222, 0.476, 0.361, 0.326, 0.093, 0.048, 0.101, 0.375, 0.321, 0.074, 0.373, 0.165]
SCIPY_BCA_RATIO = (0.94646, 1.30763)
SCIPY_BCA_MEAN8 = (0.2875, 0.65)  # the mean of test_bootstrap_interval_golden_and_paired's v


def test_bca_interval_matches_scipy_on_a_skewed_ratio():
    s, t = np.array(BCA_S), np.array(BCA_T)
    ratio = lambda i: s[i].mean() / t[i].mean()  # noqa: E731
    bca = N.bootstrap(ratio, 16, 20000, 0)
    assert (bca.low, bca.high) == pytest.approx(SCIPY_BCA_RATIO, abs=3e-3) and bca.method == "bca"
    pct = N.bootstrap(ratio, 16, 20000, 0, method="percentile")
    assert abs(pct.high - SCIPY_BCA_RATIO[1]) > 0.03  # the percentile interval is off-centre here: the test can tell
    v = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.5, 0.9, 0.3])
    assert N.bootstrap_interval(lambda i: v[i].mean(), 8, 20000, 0) == pytest.approx(SCIPY_BCA_MEAN8, abs=2e-3)
    # the golden of the default 2000 resamples, seed 0 (what validation.json records for these prompts)
    assert S.ratio_interval(s, t) == pytest.approx({"value": s.mean() / t.mean(), "low": 0.945223, "high": 1.305356},
                                                   abs=1e-6)
    try:
        from scipy import stats
    except ImportError:
        return
    ref = stats.bootstrap((s, t), lambda a, b, axis=-1: a.mean(axis) / b.mean(axis), paired=True, vectorized=True,
                          n_resamples=20000, method="BCa", random_state=np.random.default_rng(1)).confidence_interval
    assert (bca.low, bca.high) == pytest.approx((ref.low, ref.high), abs=5e-3)


def test_ratio_intervals_never_hold_nan_or_placeholders():
    # a teacher that never jitters: no ratio (it was 1e9 before), and 0/0 is no "1, 1" either — null with a why
    r = S.ratio_interval([0.1] * 16, [0.0] * 16)
    assert r["value"] is None and r["low"] is None and r["high"] is None and "zero teacher" in r["why"]
    assert S.ratio_interval([0.0] * 16, [0.0] * 16)["value"] is None
    # zero on all but one prompt: a third of the resamples have no denominator (> 5 %) — null, counted in the why
    r = S.ratio_interval([0.2] * 16, [0.0] * 15 + [0.5])
    assert r["value"] is None and "resamples had a teacher mean" in r["why"]
    # zero on 13 of 16 prompts: (13/16)^16 ≈ 3.6 % of the resamples dropped and counted; the interval stays finite
    t = np.array([0.0] * 13 + [0.4, 0.5, 0.6])
    r = S.ratio_interval(t * 0.9 + 0.01, t)
    assert 0 < r["dropped_resamples"] <= 0.05 * S.RESAMPLES
    assert all(math.isfinite(r[k]) and r[k] < 100 for k in ("value", "low", "high"))
    assert S.interval([]) == {"value": None, "low": None, "high": None}
    assert S.ratio(1.0, 0.0) is None and S.ratio(0.0, 0.0) is None
    b = N.bootstrap(lambda i: np.nan, 4)
    assert (b.low, b.high, b.dropped) == (None, None, 2000)


def test_calibration_error_hand_computed():
    # bins of width 0.1: {0.9, 0.9} → acc ½ vs conf 0.9 (weight 2/4), {0.6} → 1 vs 0.6, {0.2} → 0 vs 0.2
    assert N.calibration_error([0.9, 0.9, 0.6, 0.2], [1, 0, 1, 0]) == pytest.approx(0.4 * 2 / 4 + 0.4 / 4 + 0.2 / 4)
    assert N.calibration_error([1.0, 1.0, 0.05], [1, 1, 0]) == pytest.approx(0.05 / 3)  # conf 1.0 is in the last bin
    assert N.total_variation([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]) == pytest.approx(0.5)


def test_text_edits_of_a_fixed_string():
    s = "hello world. foo"
    assert leading_space(s) == " hello world. foo"
    assert first_letter_case(s) == "Hello world. foo"
    assert first_letter_case("  42 Ab") == "  42 ab"
    assert first_letter_case("123 (") is None
    assert trailing_punctuation(s) == "hello world. foo."
    assert trailing_punctuation("Done!") == "Done"
    assert trailing_punctuation("?") is None
    assert double_space(s) == "hello  world. foo"
    assert double_space("nospace") is None
    assert EDITS == ("leading_space", "first_letter_case", "trailing_punctuation", "double_space", "token_split")


def bpe_tokenizer():
    """A byte-level BPE with merges (the tests' tiny tokenizer has none, so it cannot show a token split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_prompt_edits_through_a_tokenizer_are_exactly_these_rows():
    tok = bpe_tokenizer()
    ids = tok.encode("hello world", add_special_tokens=False)
    pieces = lambda r: [tok.decode([i]) for i in r]  # noqa: E731
    assert pieces(ids) == ["hello", " world"]
    # the longest token " world" re-encoded as " wo" + "rld": the same text in more tokens
    assert pieces(token_split(tok, ids)) == ["hello", " ", "w", "o", "r", "ld"]
    rows = edit_prompt(tok, [tok.bos_token_id, *ids])  # the leading BOS is kept, never edited
    text = [tok.decode(r, clean_up_tokenization_spaces=False) for r in rows]
    assert text == ["<s>hello world", "<s> hello world", "<s>Hello world", "<s>hello world.", "<s>hello  world",
                    "<s>hello world"]
    assert rows[-1] != rows[0]
    # a row with an id outside the model's vocabulary is not applicable (length 0), the others stay
    cut = edited_prompts(tok, [[tok.bos_token_id, *ids]], vocab_size=267)
    assert cut.lengths.tolist() == [0, 0, 0, 0, 0, 7] and cut.per_prompt == 6
    # a special token inside the text is not split into its spelling (same text, not the same token)
    assert token_split(tok, [tok.eos_token_id, *tok.encode("a", add_special_tokens=False)]) is None


def test_sensitivity_cells_golden():
    lp = np.log(np.array([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1], [0.9, 0.1]]))
    cells = S.sensitivity_cells(lp, np.array([3, 4, 3, 0]), per_prompt=2)  # prompt 1's edit not applicable
    assert cells["kl"][0, 0] == pytest.approx(0.5 * math.log(4 / 3))
    assert cells["tv"][0, 0] == pytest.approx(0.25) and cells["flip"][0, 0] == 1.0
    assert np.isnan(cells["kl"][1, 0])
    summary = S.sensitivity_summary(cells, {k: v * 2 for k, v in cells.items()}, ("e",))
    assert summary["prompts"] == 1 and summary["ratio"]["value"] == pytest.approx(0.5)


def test_sensitivity_headline_leaves_the_control_edit_out_and_gives_a_ratio_per_edit():
    # the student moves 1.2× as much as its teacher under the real edit, and a third as much under a final '.' (a
    # flatter distribution moves less there): with the '.' in the mean, the ratio read ≈ 0.34 — "steadier"
    edits = ("leading_space", "trailing_punctuation")
    t_lead = np.linspace(0.01, 0.05, 8)
    col = lambda a, b: np.column_stack([a, np.full(8, b)])  # noqa: E731
    student = {"kl": col(1.2 * t_lead, 1.0), "tv": col(t_lead, 0.5), "flip": col(np.zeros(8), 0.5)}
    teacher = {"kl": col(t_lead, 3.0), "tv": col(t_lead, 0.9), "flip": col(np.zeros(8), 0.9)}
    out = S.sensitivity_summary(student, teacher, edits)
    assert out["edits"] == ["leading_space"] and out["control_edits"] == ["trailing_punctuation"]
    assert out["ratio"] == pytest.approx({"value": 1.2, "low": 1.2, "high": 1.2})
    assert out["per_edit_ratio"]["leading_space"] == pytest.approx({"value": 1.2, "low": 1.2, "high": 1.2,
                                                                    "prompts": 8})
    assert out["per_edit_ratio"]["trailing_punctuation"]["value"] == pytest.approx(1 / 3)
    assert out["control"]["ratio"]["value"] == pytest.approx(1 / 3) and out["control"]["edits"] == list(edits[1:])
    assert out["student"]["per_edit"]["kl"]["trailing_punctuation"] == pytest.approx(1.0)


def test_excess_kl_from_the_teacher_on_edited_prompts_golden():
    # one prompt, its baseline and one edit; the teacher's top-1 bucket + tail on each row (K = 1, V = 3)
    buckets = np.log([[0.6, 0.4], [0.7, 0.3]])
    idx = np.array([[0], [1]])
    student = np.log([[0.6, 0.2, 0.2], [0.5, 0.3, 0.2]])  # on the baseline it matches the teacher's buckets exactly
    cells = S.excess_kl_cells(buckets, idx, student, np.array([3, 4]), per_prompt=2)
    assert cells["original"][0] == pytest.approx(0.0, abs=1e-6)
    assert cells["excess"][0, 0] == pytest.approx(0.4 * math.log(7 / 3), rel=1e-6)  # KL([.7,.3]‖[.3,.7])
    assert np.isnan(S.excess_kl_cells(buckets, idx, student, np.array([3, 0]), 2)["excess"][0, 0])
    s_cells = {"kl": np.array([[0.2]]), "tv": np.array([[0.1]]), "flip": np.array([[0.0]])}
    out = S.sensitivity_summary(s_cells, s_cells, ("double_space",), cells)
    assert out["excess_kl"]["value"] == pytest.approx(0.4 * math.log(7 / 3), rel=1e-6)
    assert set(out["excess_kl_per_edit"]) == {"double_space"} and "kl_to_teacher_original" in out


def test_confidence_and_calibration_against_the_next_token_golden():
    # 2 prompts × 3 positions, vocabulary 3; confidences kept away from the ECE bin edges
    sp = np.array([[[0.18, 0.72, 0.10], [0.52, 0.13, 0.35], [0.24, 0.23, 0.53]],
                   [[0.09, 0.83, 0.08], [0.91, 0.05, 0.04], [0.17, 0.19, 0.64]]])
    ids = np.array([[0, 1, 2], [1, 1, 0]])  # next tokens: prompt 0 → 1, 2; prompt 1 → 1, 0
    t_top1 = np.array([[1, 2, 2], [1, 1, 2]])
    t_p = np.array([[0.61, 0.46, 0.57], [0.92, 0.36, 0.44]])
    t_nll = np.array([[0.5, 0.8], [0.1, 1.2]])
    c = S.confidence_summary(np.log(sp), np.log(t_p), t_top1, ids=ids, teacher_nll=t_nll, threshold=0.55)
    st, te = c["student"], c["teacher"]
    assert c["prompts"] == 2 and c["positions"] == 6
    # student vs the next token: .72 ✓, .52 ✗, .83 ✓, .91 ✓ (one per bin): (.28 + .52 + .17 + .09) / 4
    assert st["ece_next_token"]["value"] == pytest.approx(0.265)
    # teacher: .61 ✓, .46 ✓, .92 ✓, .36 ✗: (.39 + .54 + .08 + .36) / 4
    assert te["ece_next_token"]["value"] == pytest.approx(0.3425)
    assert c["ece_next_token_difference"]["value"] == pytest.approx(0.265 - 0.3425)
    s_nll = (-(math.log(0.72) + math.log(0.35)) / 2 - (math.log(0.83) + math.log(0.91)) / 2) / 2
    assert st["nll_next_token"]["value"] == pytest.approx(s_nll) and te["nll_next_token"]["value"] == pytest.approx(0.65)
    assert c["nll_next_token_difference"]["value"] == pytest.approx(s_nll - 0.65)
    # below 0.55: student 2/3 and 0 of each prompt's positions, teacher 1/3 and 2/3
    assert st["low_confidence"]["value"] == pytest.approx(1 / 3) and te["low_confidence"]["value"] == pytest.approx(0.5)
    assert c["ratio"]["value"] == pytest.approx(2 / 3)
    assert st["mean_top1_prob"]["value"] == pytest.approx((0.59 + 2.38 / 3) / 2)
    assert te["mean_top1_prob"]["value"] == pytest.approx(0.56)
    # agreement with the teacher's top-1: .72 ✓ | .52 ✗ .53 ✓ (one bin: 2·|½ - .525|) | .83 ✓ | .91 ✗ | .64 ✓
    assert st["ece_vs_teacher_greedy"]["value"] == pytest.approx((0.28 + 0.05 + 0.17 + 0.91 + 0.36) / 6)
    assert "ece" not in st


def test_stability_seeds_give_every_prompt_its_own_streams():
    assert S.stability_seeds(2, 3, 3) == [[0, 1, 2], [3, 4, 5]]
    # a student asked for more samples than the teacher stored: the first n_ref as the teacher's, then fresh seeds
    assert S.stability_seeds(2, 4, 3) == [[0, 1, 2, 6], [3, 4, 5, 7]]
    assert S.stability_seeds(2, 2, 3) == [[0, 1], [3, 4]]


def test_jitter_per_prompt_golden():
    toks = np.array([[1, 2], [1, 2], [1, 3], [4, 5],  # prompt 0: heads@1 {1: 3, 4: 1}
                     [7, 7], [7, 7], [7, 7], [7, 7]])  # prompt 1: always the same
    per = consistency.per_prompt(toks, np.ones((8, 2)), 4, 1)
    assert per["pairwise_agreement@1"] == pytest.approx([6 / 12, 1.0])  # 3·2 of 4·3 ordered pairs agree
    assert per["jitter@1"] == pytest.approx([0.5, 0.0])
    assert per["modal_share@1"] == pytest.approx([0.75, 1.0])
    # the O(N) formula is the share of agreeing pairs, as the pair list counted it
    assert consistency.pairwise_agreement([(1,), (1,), (1,), (4,)], 1) == pytest.approx(3 / 6)


# -- gates -------------------------------------------------------------------------------------------------------
def metrics(kl=0.01, **ratios):
    m = {"kl_topk": kl, "top1_agreement": 0.9, "greedy_match": 0.5, "ppl_ratio": 1.0, "consistency_ratio": 1.0,
         "deterministic": True, "jitter_ratio": 1.0, "sensitivity_ratio": 1.0, "low_confidence_ratio": 1.0}
    return {**m, **ratios}


def test_stability_gates_fail_above_the_ratio_and_only_count_beside_kl():
    rows = {r["gate"]: r for r in evaluate(metrics(jitter_ratio=1.2), Gates(max_jitter_ratio=1.1))}
    assert not rows["jitter_ratio"]["passed"] and rows["kl_topk"]["passed"]
    rows = {r["gate"]: r for r in evaluate(metrics(jitter_ratio=1.05), Gates(max_jitter_ratio=1.1))}
    assert rows["jitter_ratio"]["passed"]
    # off by default: no row, whatever the ratio
    assert "sensitivity_ratio" not in {r["gate"] for r in evaluate(metrics(sensitivity_ratio=50.0), Gates())}
    # a collapsed student: steady (ratio 0.1) but far from the teacher — the stability gate does not pass it
    rows = {r["gate"]: r for r in evaluate(metrics(kl=3.0, low_confidence_ratio=0.1),
                                           Gates(max_low_confidence_ratio=1.0))}
    assert not rows["kl_topk"]["passed"] and not rows["low_confidence_ratio"]["passed"]
    assert "kl_topk failed" in rows["low_confidence_ratio"]["note"]
    # asked for but not measured (old references): no row, one note
    m = metrics(sensitivity_ratio=None)
    assert "sensitivity_ratio" not in {r["gate"] for r in evaluate(m, Gates(max_sensitivity_ratio=1.0))}
    assert skipped_gates(m, Gates(max_sensitivity_ratio=1.0)) == [
        "--max-sensitivity-ratio not applied: sensitivity_ratio was not measured on this bundle (see the notes above)"]
    with pytest.raises(Exception, match="--max-jitter-ratio must be a finite number > 0"):
        Gates(max_jitter_ratio=-1.0).check_ranges()


# -- shared-cache sampling on a target ---------------------------------------------------------------------------
def test_sample_repeated_shares_the_prompt_cache_and_chunking_changes_nothing(exported):
    from sparsekd_deploy.targets.onnxruntime import OnnxRuntimeTarget

    _, onnx_path = exported["llama"]
    t = OnnxRuntimeTarget(onnx_path, max_positions=64)
    prompts = np.random.default_rng(3).integers(0, 256, (3, 6))
    calls = []
    forward = t._forward
    t._forward = lambda ids, past, n: calls.append(ids.shape) or forward(ids, past, n)
    got = t.sample_repeated(prompts, 5, 4, 1.0)
    assert calls[0] == (3, 6) and calls[1] == (15, 1)  # each prompt's prefix once, then 15 rows from its cache
    # the same tokens as the plain path (every row prefilled on its own), row j of each prompt with seed j
    plain = t.generate(np.repeat(prompts, 5, axis=0), 4, temperature=1.0, seeds=list(range(5)) * 3)
    np.testing.assert_array_equal(got.tokens, plain.tokens)
    np.testing.assert_allclose(got.entropies, plain.entropies, rtol=1e-6)
    t.sample_rows = 4  # 15 rows in chunks of 4
    chunked = t.sample_repeated(prompts, 5, 4, 1.0)
    assert chunked.chunks == 4 and chunked.rows_per_chunk == 4
    np.testing.assert_array_equal(chunked.tokens, got.tokens)
    t._gather_past = lambda past, rows: None  # a runtime that cannot copy cache rows: the prefix runs per row
    np.testing.assert_array_equal(t.sample_repeated(prompts, 5, 4, 1.0).tokens, got.tokens)
    # per-prompt seeds [P, n]: row j of prompt p draws from seeds[p][j] (stability: p·N + j, no stream shared)
    per = t.sample_repeated(prompts, 5, 4, 1.0, seeds=S.stability_seeds(3, 5, 5))
    np.testing.assert_array_equal(per.tokens, t.generate(np.repeat(prompts, 5, axis=0), 4, temperature=1.0,
                                                         seeds=list(range(15))).tokens)
    with pytest.raises(Exception, match="one seed per sample"):
        t.sample_repeated(prompts, 5, 4, 1.0, seeds=[[0] * 5] * 2)


# -- through the CLI ---------------------------------------------------------------------------------------------
def run(args):
    return CliRunner().invoke(main_cli(), args, catch_exceptions=False)


def main_cli():
    from sparsekd_deploy.cli import main

    return main


def report_of(r):
    return json.loads(r.stdout[r.stdout.index("{"):])


@pytest.fixture(scope="module")
def bundle(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("stability")
    r = run(["build", "--target", "onnxruntime", "--teacher", str(tiny_dirs["llama"]), "--out", str(root / "b"),
             "--run-dir", str(root / "run"), *FAST, *LOOSE])
    assert r.exit_code == 0, r.output
    return root / "b"


def test_build_records_teacher_stability_and_the_trajectory_carries_it(bundle, tiny_dirs):
    meta = json.loads((bundle / "references" / "references.json").read_text())
    ts = meta["teacher_stability"]
    assert meta["stability_samples"] == 256 and set(ts["jitter"]) == {"16", "256"}
    j = ts["jitter"]["256"]["jitter@2"]
    assert j["low"] <= j["value"] <= j["high"]
    assert 0 <= ts["low_confidence"]["value"] <= 1 and meta["low_confidence_threshold"] == 0.3
    # the tests' tokenizer has no merges: the four text edits apply, the token split never does
    assert meta["sensitivity_edits"] == list(EDITS)
    sens = ts["sensitivity"]
    assert sens["teacher"]["per_edit"]["kl"]["token_split"] is None and sens["teacher"]["kl"]["value"] > 0
    assert sens["edits"] == [e for e in EDITS if e != "trailing_punctuation"] and "control" in sens
    # confidence on as many prompts as the jitter; sample j of prompt p seeded p·N + j (no stream shared by prompts)
    assert meta["prompts"] == meta["stability_prompts"] == 16 and meta["stability_seeding"] == S.SEEDING
    from safetensors.numpy import load_file

    from sparsekd_deploy.models.loading import load_model
    from sparsekd_deploy.targets.torch_cuda import TorchTarget

    t = load_file(str(bundle / "references" / "references.safetensors"))
    teacher = TorchTarget.from_model(load_model(tiny_dirs["llama"], role="teacher"))
    again = teacher.generate(t["stability_prompts"][1:2], t["teacher_samples"].shape[1], temperature=0.7, seeds=[256 + 3])
    np.testing.assert_array_equal(again.tokens[0], t["teacher_samples"][256 + 3])
    assert t["teacher_sensitivity_buckets"].shape == (len(t["sensitivity_ids"]), 33)
    stages = json.loads((bundle / "trajectory.json").read_text())["stages"]
    accepted = [s for s in stages[1:] if s["accepted"]]
    assert accepted and all({"jitter", "low_confidence", "sensitivity"} <= set(s["stability"]) for s in accepted)
    lc = accepted[-1]["stability"]["low_confidence"]
    assert lc["ratio"] == pytest.approx(S.ratio(lc["student"], lc["teacher"])) and "ece_vs_teacher_greedy" in lc
    assert accepted[-1]["stability"]["sensitivity"]["control"]["edits"] == ["trailing_punctuation"]


def test_validate_samples_is_chunked_and_compared_with_the_stored_teacher(bundle, tmp_path, monkeypatch):
    from sparsekd_deploy.targets.base import Target

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    monkeypatch.setattr(Target, "sample_rows", 1000)
    r = run(["validate", str(b), "--samples", "300", "--json", *LOOSE])
    assert r.exit_code == 0, r.output
    rep = report_of(r)
    j = rep["metrics"]["stability"]["jitter"]
    # 16 prompts × 300 rows run in chunks of 1000; the teacher stored 256 per prompt, so the ratio is taken there
    assert (j["samples"], j["prompts"], j["chunks"], j["rows_per_chunk"], j["compared_at"]) == (300, 16, 5, 1000, 256)
    assert any("first 256 of the student's 300" in n for n in rep["metrics"]["stability"]["notes"])
    monkeypatch.setattr(Target, "sample_rows", 100_000)
    one = report_of(run(["validate", str(b), "--samples", "300", "--json", *LOOSE]))["metrics"]["stability"]["jitter"]
    assert one["chunks"] == 1 and one["student"] == j["student"] and one["ratio"] == j["ratio"]
    for stat in j["student"].values():
        assert stat["low"] <= stat["value"] <= stat["high"]
    ar = j["agreement_ratio"]  # pairwise agreement student / teacher: the unsqueezed side of jitter
    assert ar["low"] <= ar["value"] <= ar["high"]
    stab = rep["metrics"]["stability"]
    sens, conf = stab["sensitivity"], stab["confidence"]
    assert sens["control_edits"] == ["trailing_punctuation"] and set(sens["per_edit_ratio"]) == set(EDITS)
    assert sens["per_edit_ratio"]["token_split"]["value"] is None  # never applies with the tests' tokenizer
    assert sens["prompts"] == j["prompts"] == conf["prompts"] == 16 and "excess_kl" in sens
    assert {"ece_next_token", "nll_next_token", "mean_top1_prob", "ece_vs_teacher_greedy"} <= set(conf["student"])
    assert {"ece_next_token", "nll_next_token", "mean_top1_prob"} <= set(conf["teacher"])
    assert stab["bootstrap"]["method"] == "BCa"
    text = " ".join(run(["validate", str(b), "--samples", "16", *LOOSE]).output.split())
    assert "per edit, KL student / teacher: leading_space" in text and "trailing_punctuation (control)" in text
    assert "pairwise_agreement@2: student" in text and "calibration vs the reference text's next token" in text
    r = run(["validate", str(b), "--samples", "1"])
    assert r.exit_code == 2 and "--samples" in r.output


def test_jitter_gate_through_the_cli(bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    rep = report_of(run(["validate", str(b), "--json", *LOOSE]))
    ratio = rep["metrics"]["jitter_ratio"]
    assert ratio == rep["metrics"]["stability"]["jitter"]["ratio"]["value"]
    r = run(["validate", str(b), "--json", "--max-jitter-ratio", str(ratio * 0.5), *LOOSE])
    assert r.exit_code == 1 and not next(g for g in report_of(r)["gates"] if g["gate"] == "jitter_ratio")["passed"]
    r = run(["validate", str(b), "--json", "--max-jitter-ratio", str(ratio * 2), *LOOSE])
    assert r.exit_code == 0 and next(g for g in report_of(r)["gates"] if g["gate"] == "jitter_ratio")["passed"]


def test_a_bundle_recorded_before_the_stability_references_gets_one_note_and_a_verdict(bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    from sparsekd_deploy.bundle import file_table

    b = tmp_path / "old"
    shutil.copytree(bundle, b)
    ref = b / "references"
    new_keys = ("stability_prompts", "teacher_samples", "teacher_sample_entropy", "sensitivity_ids", "sensitivity_len",
                "teacher_sensitivity_kl", "teacher_sensitivity_tv", "teacher_sensitivity_flip",
                "teacher_sensitivity_topk_idx", "teacher_sensitivity_buckets")
    tensors = {k: v for k, v in load_file(str(ref / "references.safetensors")).items() if k not in new_keys}
    save_file(tensors, str(ref / "references.safetensors"))
    meta = json.loads((ref / "references.json").read_text())
    for k in ("stability_samples", "teacher_stability", "sensitivity_edits", "sensitivity_skipped",
              "low_confidence_threshold", "stability_prompts", "stability_seeding"):
        meta.pop(k, None)
    (ref / "references.json").write_text(json.dumps(meta))
    m = json.loads((b / "manifest.json").read_text())
    m["files"] = file_table(b)
    (b / "manifest.json").write_text(json.dumps(m))

    r = run(["validate", str(b), "--max-sensitivity-ratio", "1.0", *LOOSE])
    assert r.exit_code == 0, r.output  # the verdict comes from the rest
    out = " ".join(r.output.split())
    assert out.count("predate the stability references") == 1
    assert "jitter intervals and sensitivity not measured" in out and "--resume --overwrite" in out
    assert "--max-sensitivity-ratio not applied" in out and "verdict: PASS" in out
    v = json.loads((b / "validation.json").read_text())["metrics"]
    assert v["stability"]["jitter"] is None and v["stability"]["sensitivity"] is None
    assert v["jitter_ratio"] is None and v["sensitivity_ratio"] is None
    assert v["low_confidence_ratio"] is not None  # computed from the top-k references every bundle has


def test_references_without_a_tokenizer_skip_sensitivity_with_the_reason(tmp_path):
    import torch
    from conftest import build_tiny

    from sparsekd_deploy.validate import stability
    from sparsekd_deploy.validate.references import References, RefSettings, record
    from sparsekd_deploy.validate.stability_record import NO_TOKENIZER

    model = build_tiny("llama")
    heldout = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    meta = record(model, heldout, tmp_path, RefSettings(prompts=2, length=24, prefix=8, samples=3,
                                                        stability_prompts=3, stability_samples=5), tokenizer=None)
    assert meta["sensitivity_skipped"] == NO_TOKENIZER and "sensitivity_edits" not in meta
    assert meta["stability_samples"] == 5 and set(meta["teacher_stability"]["jitter"]) == {"3", "5"}
    refs = References({}, meta)
    assert stability.sensitivity(None, refs) == {"skipped": NO_TOKENIZER}
    assert "sensitivity skipped: the bundle has no tokenizer" in " ".join(
        stability.stability_lines({"sensitivity": {"skipped": NO_TOKENIZER}}))
