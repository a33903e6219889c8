"""`sparsekd-deploy report`: claims judged on intervals, a page that opens in a real browser, bad input in one line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsekd_deploy.cli import main
from sparsekd_deploy.report.claims import HELD, NOT_HELD, NOT_MEASURED, NOT_SHOWN, claims
from sparsekd_deploy.report.collect import ReportData

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _data(ratio=None, kl=0.01, status="complete", passed=True):
    stages = [{"stage": 0, "label": "dense", "sparsity": 0.0, "kl": 0.0, "accepted": True},
              {"stage": 1, "label": "2:4", "sparsity": 0.5, "kl": kl, "accepted": True}]
    val = {"passed": passed, "gates": [{"gate": "kl_topk", "passed": passed}], "runtime": {"runtime": "onnxruntime"},
           "metrics": {"kl_topk": kl, "stability": {"jitter": {"ratio": ratio}} if ratio else {}}}
    return ReportData("bundle", Path("b"), "b", {"budget": 0.15, "status": status, "reason": "r", "stages": stages},
                      validation=val)


@pytest.mark.parametrize("ratio, verdict", [
    ({"value": 0.9, "low": 0.8, "high": 0.99}, HELD),
    ({"value": 1.2, "low": 1.05, "high": 1.4}, NOT_HELD),
    ({"value": 0.95, "low": 0.85, "high": 1.05}, NOT_SHOWN),  # the interval straddles 1: cannot tell
    (None, NOT_MEASURED),
    ({"value": 1.0, "low": 1.0, "high": 1.0}, NOT_SHOWN),  # 0/0 on every resample: degenerate, not "held"
    ({"value": 0.5, "low": 0.0, "high": 1e9}, NOT_MEASURED),  # a zero-denominator placeholder is no interval
    ({"value": float("nan"), "low": 0.9, "high": 1.1}, NOT_MEASURED),
])
def test_stability_claims_are_judged_on_their_interval(ratio, verdict):
    jitter = next(c for c in claims(_data(ratio)) if "repeated prompts" in c.name)
    assert jitter.verdict == verdict


def test_fewer_unsure_positions_with_worse_calibration_is_overconfidence():
    d = _data()
    d.validation["metrics"]["stability"] = {"confidence": {
        "ratio": {"value": 0.9, "low": 0.85, "high": 0.95},
        "nll_next_token_difference": {"value": 0.02, "low": 0.01, "high": 0.04}}}
    conf = next(c for c in claims(d) if "low-confidence" in c.name)
    assert conf.verdict == NOT_SHOWN and "overconfidence" in conf.sentence
    d.validation["metrics"]["stability"]["confidence"]["nll_next_token_difference"] = {
        "value": 0.0, "low": -0.01, "high": 0.01}
    assert next(c for c in claims(d) if "low-confidence" in c.name).verdict == HELD


def test_a_null_ratio_says_why():
    d = _data()
    d.validation["metrics"]["stability"] = {"jitter": {"ratio": {"value": None, "low": None, "high": None,
                                                                 "why": "the teacher never jitters"}}}
    jitter = next(c for c in claims(d) if "repeated prompts" in c.name)
    assert jitter.verdict == NOT_MEASURED and "the teacher never jitters" in jitter.sentence


def test_a_steady_student_does_not_count_when_kl_failed():
    c = claims(_data({"value": 0.5, "low": 0.4, "high": 0.6}, kl=0.9, passed=False))
    assert [x.verdict for x in c[:2]] == [NOT_HELD, NOT_HELD]
    jitter = next(x for x in c if "repeated prompts" in x.name)
    assert jitter.verdict == NOT_SHOWN and "collapsed model" in jitter.sentence


def test_stopped_run_says_so_at_the_top(tmp_path):
    d = _data(status="stopped")
    assert claims(d)[0].verdict == NOT_HELD and "stopped before its target" in claims(d)[0].sentence
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trajectory.json").write_text(json.dumps(d.trajectory))
    r = run(["report", str(run_dir), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "r.html").read_text()
    assert html.index('id="stopped-early"') < html.index("Which claims held")
    assert (tmp_path / "r.md").read_text().split("\n\n")[2].startswith("> **This run stopped early**")


def test_bundle_report_html_and_markdown(ort_bundle, tmp_path):
    b = ort_bundle
    r = run(["report", str(b), "--out", str(tmp_path / "out" / "page.html"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["stopped_early"] is False and out["claims"][0]["claim"] == "heavy removal without collapse"
    html = (tmp_path / "out" / "page.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched from a network
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) >= 2
    md = (tmp_path / "out" / "page.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / "out" / link).is_file()


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_text("x"), "is not a directory"),
    (lambda p: p.mkdir(), "neither a bundle"),
    (lambda p: (p.mkdir(), (p / "trajectory.json").write_text("{oops")), "not valid JSON"),
    (lambda p: (p.mkdir(), (p / "trajectory.json").write_text("[]")), "not a trajectory"),
    (lambda p: (p.mkdir(), (p / "trajectory.json").write_text('{"stages": [1, "x"]}')), "stage 0 is not a record"),
    (lambda p: (p.mkdir(), (p / "trajectory.json").write_text('{"stages": [{"kl": "a"}]}')), "non-numeric kl"),
])
def test_bad_sources_are_one_line(tmp_path, make, needle):
    src = tmp_path / "src"
    make(src)
    r = run(["report", str(src), "--out", str(tmp_path / "r.html")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
    assert not (tmp_path / "r.html").exists()



@pytest.mark.parametrize("flag", ["--out", "--md"])
def test_an_output_that_is_a_directory_is_named_as_such(tmp_path, flag):
    """The atomic write's rename failed on the directory and the line named only its <out>.tmp file; with --md a
    directory, the HTML page was written before the failure."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trajectory.json").write_text(json.dumps(_data(status="complete").trajectory))
    (tmp_path / "dir").mkdir()
    out = tmp_path / ("r.html" if flag == "--md" else "dir")
    args = ["--out", str(out)] + (["--md", str(tmp_path / "dir")] if flag == "--md" else [])
    r = run(["report", str(run_dir), *args])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and f"{flag} {tmp_path / 'dir'} is a directory" in lines[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "run"]

_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const vw = document.documentElement.clientWidth;
  const over = [...document.body.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right > vw + 1)
      .map(e => e.tagName + ':' + (e.textContent || '').slice(0, 40));
  document.title = 'PROBE' + JSON.stringify({images: imgs.length,
      broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
      scroll: document.documentElement.scrollWidth, width: vw, overflowing: over});
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium (Debian package chromium) is not installed; .ci/run installs it")
@pytest.mark.parametrize("width", [1280, 700])
def test_page_opens_in_headless_chromium(ort_bundle, tmp_path, width):
    b = ort_bundle
    assert run(["report", str(b), "--out", str(tmp_path / "page.html"), "--no-md"]).exit_code == 0
    probe = tmp_path / "probe.html"
    probe.write_text((tmp_path / "page.html").read_text().replace("</body>", _PROBE))
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                           "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"<title>PROBE(.*?)</title>", done.stdout)
    assert m, done.stderr[-2000:]
    res = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert res["images"] >= 2 and res["broken"] == 0, res
    assert res["scroll"] <= res["width"] and res["overflowing"] == [], res
