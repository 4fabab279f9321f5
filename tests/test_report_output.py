"""Report files: CSV/Markdown equal the tables, PNGs are real images, the HTML page embeds them."""
from __future__ import annotations

import argparse
import base64
import json
import math
import struct
import subprocess
import sys

import pandas as pd
import pytest

from flexgen_helm import ConfigError
from flexgen_helm.report import cli
from flexgen_helm.report.build import build_report

try:
    from test_report_helmfmt import write_run
    from test_report_load import MMLU, MMLU_EM, MMLU_SPLIT, SRN, WIKI, XSUM, make_fp16
except ImportError:
    from tests.test_report_helmfmt import write_run
    from tests.test_report_load import MMLU, MMLU_EM, MMLU_SPLIT, SRN, WIKI, XSUM, make_fp16

PNGS = ("accuracy.png", "throughput.png", "time_breakdown.png", "paper_times.png")


def _int4(tmp_path):
    write_run(tmp_path / "runs" / "int4", MMLU, ["mmlu"], {i: {"exact_match": 0.0} for i in MMLU_EM}, MMLU_SPLIT,
              {i: "B" for i in MMLU_EM}, deployment="flexgen/opt-1.3b-4bit")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    make_fp16(tmp)
    _int4(tmp)
    pred = tmp / "pred.json"
    pred.write_text(json.dumps({"sub_scenarios": [
        {"name": "wikifact:k=5,subject=instance_of", "predicted_s": 1200.0},
        {"name": "mmlu:subject=us_foreign_policy", "predicted_s": 60.0, "instances": 10}]}))
    rep = build_report(tmp, "fp16", ["int4"], tmp / "out", predicted=pred, n_boot=300)
    return tmp / "out", rep


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_files_and_images(report):
    out, rep = report
    for name in ("summary.csv", "summary.md", "report.html", "compare.csv", "paper_table.csv", "metrics.csv", *PNGS):
        assert (out / name).stat().st_size > 0, name
        assert (out / name).stat().st_size < 1_000_000, name
    html = (out / "report.html").read_text()
    for name in PNGS:
        w, h = png_size(out / name)
        assert 400 <= w <= 3000 and 200 <= h <= 3000, (name, w, h)
        from matplotlib.image import imread
        assert imread(out / name).shape[:2] == (h, w)
        assert base64.b64encode((out / name).read_bytes()).decode() in html   # embedded, not linked
    assert "src='http" not in html and 'src="http' not in html and "<link" not in html


def test_csv_and_markdown_equal_the_tables(report):
    out, rep = report
    csv = pd.read_csv(out / "summary.csv", float_precision="round_trip")
    assert list(csv.columns) == list(rep.summary.columns) and len(csv) == len(rep.summary) == 8
    for col in ("score", "stderr", "wall_s", "prefill_tok_s", "decode_tok_s", "padding_efficiency", "peak_gpu_GB"):
        a, b = csv[col].to_numpy(float), pd.to_numeric(rep.summary[col]).to_numpy(float)
        assert ((a == b) | (pd.isna(a) & pd.isna(b))).all(), col   # full precision round trip
    long = pd.read_csv(out / "metrics.csv", float_precision="round_trip")
    run_dir = next((out.parent / "runs" / "fp16").glob("mmlu*"))
    want = {(s["name"]["name"], s["name"]["split"]): s["mean"] for s in json.loads((run_dir / "stats.json").read_text())
            if "perturbation" not in s["name"]}
    got = long[(long.suite == "fp16") & (long.sub_scenario == MMLU)]
    assert {(m, sp): v for m, sp, v in zip(got.metric, got.split, got.value)} == want
    md = (out / "summary.md").read_text()
    fp_mmlu = rep.summary[(rep.summary.suite == "fp16") & (rep.summary.sub_scenario == MMLU)].iloc[0]
    assert f"| fp16 | {MMLU} | ok | exact_match | {fp_mmlu.score:.4g} ± {fp_mmlu.stderr:.2g} |" in md
    assert f"| fp16 | {WIKI} | GAP: run failed" in md
    assert f"| int4 | {XSUM} | GAP: not run in this suite |" in md
    html = (out / "report.html").read_text()
    assert html.count("<tr class=gap>") >= 4    # failed wikifact, and int4's missing runs


def test_comparison_and_paper_tables(report):
    out, rep = report
    cmp = pd.read_csv(out / "compare.csv")
    r = cmp[cmp.sub_scenario == MMLU].iloc[0]
    assert r.n_shared == 4 and r.delta == pytest.approx(-0.75) and r.changed_share == pytest.approx(1.0)
    assert cmp[cmp.sub_scenario == SRN].iloc[0].note == "GAP: not run in int4"
    paper = rep.paper[rep.paper.suite == "fp16"].set_index("paper_entry")
    assert paper.loc["wikifact:k=5,subject=instance_of", "source"] == "predicted"
    assert paper.loc["wikifact:k=5,subject=instance_of", "ours_min"] == pytest.approx(20.0)
    assert paper.loc["mmlu:subject=us_foreign_policy", "ours_min"] == pytest.approx(1.0 * 100 / 10)  # rescaled
    measured = paper.loc["mmlu:subject=abstract_algebra"]
    wall = rep.summary[(rep.summary.suite == "fp16") & (rep.summary.sub_scenario == MMLU)].iloc[0].wall_s
    assert measured.source == "measured on 6, scaled"
    assert measured.measured_min == pytest.approx(wall / 60) and measured.ours_min == pytest.approx(wall / 60 * 100 / 6)
    assert paper.loc["wikifact:k=5,subject=plaintiff", "source"] == "run failed"
    assert paper.loc["synthetic_reasoning:mode=pattern_match", "source"] == "not run"
    int4 = rep.paper[rep.paper.suite == "int4"].set_index("paper_entry")
    assert int4.loc["mmlu:subject=abstract_algebra", "source"] == "run had no timing"
    assert paper.loc["TOTAL", "paper_min"] == 1249 and paper.loc["TOTAL", "source"].startswith("incomplete")
    assert math.isnan(paper.loc["TOTAL", "ours_min"])


def test_accuracy_plot_shows_each_delta_with_its_interval(report, tmp_path, monkeypatch):
    """The delta panel: one bar per compared sub-scenario at its row, width = delta, error bar = the
    paired bootstrap interval; a sub-scenario without paired instances is said so, not drawn as 0."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    from flexgen_helm.report import plots
    _, rep = report
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    plots.accuracy_plot(rep.summary, tmp_path / "a.png", rep.comparisons)
    scores, deltas = figs[0].axes[:2]
    subs = list(dict.fromkeys(rep.summary["sub_scenario"]))
    bars = [p for p in deltas.patches if isinstance(p, Rectangle) and p.get_height() > 0]
    shared = rep.comparisons[rep.comparisons["delta"].notna()]
    assert len(bars) == len(shared) >= 1
    for bar, (_, r) in zip(bars, shared.iterrows()):
        assert bar.get_width() == pytest.approx(r.delta)
        row = bar.get_y() + bar.get_height() / 2
        assert subs.index(r.sub_scenario) < row < subs.index(r.sub_scenario) + 0.5   # its row, second suite's slot
    spans = [seg for c in deltas.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    ends = {(round(min(x for x, _ in seg), 9), round(max(x for x, _ in seg), 9)) for seg in spans}
    for _, r in shared.iterrows():
        assert (round(r.ci_low, 9), round(r.ci_high, 9)) in ends
    texts = [t.get_text() for t in deltas.texts]
    assert sum("no paired instances" in t for t in texts) == rep.comparisons["delta"].isna().sum() >= 1
    plots.accuracy_plot(rep.summary, tmp_path / "b.png")
    assert len(figs[1].axes) == 1   # no comparison: the score panel alone


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_writes_report_and_reports_errors(tmp_path, capsys):
    make_fp16(tmp_path)
    args = _parse(["report", "--suite", "fp16", "--output-path", str(tmp_path), "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    assert "gap(s)" in capsys.readouterr().out and (tmp_path / "r" / "report.html").exists()
    bad = _parse(["report", "--suite", "fp16", "--compare", "missing", "--output-path", str(tmp_path),
                  "--out", str(tmp_path / "r2")])
    with pytest.raises(ConfigError, match="no suite folder"):
        bad.func(bad)
    bad_pred = tmp_path / "p.json"
    bad_pred.write_text("{}")
    args = _parse(["report", "--suite", "fp16", "--output-path", str(tmp_path), "--out", str(tmp_path / "r3"),
                   "--predicted", str(bad_pred)])
    with pytest.raises(ConfigError, match="predicted_s"):
        args.func(args)


def test_report_imports_neither_engine_nor_helm():
    code = ("import sys, flexgen_helm.report.build, flexgen_helm.report.cli; "
            "bad = [m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'helm' "
            "or m.startswith('flexgen_helm.engine.') and m != 'flexgen_helm.engine.config']; print(bad)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
