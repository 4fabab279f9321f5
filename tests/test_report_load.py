"""Report tables: every number must equal what the run folders and the timing log say; gaps are marked."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from flexgen_helm import ConfigError
from flexgen_helm.report.load import ReportError, load_suite, sub_scenario_of
from flexgen_helm.report.tables import summary_table

try:
    from test_report_helmfmt import batch, run_name, write_run, write_timing
except ImportError:  # tests/ imported as a package
    from tests.test_report_helmfmt import batch, run_name, write_run, write_timing

GIB = 2**30
MMLU = "mmlu:subject=abstract_algebra,method=multiple_choice_joint"
SRN = "synthetic_reasoning_natural:difficulty=easy"
XSUM = "flexgen_xsum:temperature=0.3"
WIKI = "wikifact:k=5,subject=plaintiff"

MMLU_EM = {"i0": 1.0, "i1": 0.0, "i2": 1.0, "i3": 1.0, "i4": 0.0, "i5": 1.0}
MMLU_QEM = {"i0": 1.0, "i1": 1.0, "i2": 1.0, "i3": 1.0, "i4": 0.0, "i5": 1.0}
MMLU_SPLIT = {"i0": "test", "i1": "test", "i2": "test", "i3": "test", "i4": "valid", "i5": "valid"}
SRN_F1 = {"s0": 0.5, "s1": 0.25, "s2": 1.0}
SRN_SPLIT = {"s0": "test", "s1": "test", "s2": "test"}
XSUM_RL = {"x0": 0.3, "x1": 0.1}
XSUM_SPLIT = {"x0": "test", "x1": "test"}


def make_fp16(out):
    suite = out / "runs" / "fp16"
    write_run(suite, MMLU, ["mmlu"], {i: {"exact_match": MMLU_EM[i], "quasi_exact_match": MMLU_QEM[i]}
                                      for i in MMLU_EM}, MMLU_SPLIT, {i: "A" for i in MMLU_EM})
    write_run(suite, SRN, ["synthetic_reasoning", "synthetic_reasoning_natural"],
              {i: {"quasi_exact_match": 0.0, "f1_set_match": v} for i, v in SRN_F1.items()}, SRN_SPLIT,
              {i: "x" for i in SRN_F1}, trials=2)
    write_run(suite, XSUM, ["flexgen_xsum"], {i: {"rouge_l": v} for i, v in XSUM_RL.items()}, XSUM_SPLIT,
              {i: "sum" for i in XSUM_RL})
    write_run(suite, WIKI, ["wikifact"], {"w0": {"quasi_exact_match": 1.0}}, {"w0": "test"}, {"w0": "a"},
              omit=("run_spec.json", "scenario.json", "scenario_state.json", "stats.json", "per_instance_stats.json"))
    mmlu, srn, xsum = (run_name(suite, p) for p in (MMLU, SRN, XSUM))
    write_timing(suite, [
        batch("fp16", "b0", {mmlu: {"rows": 6, "prompt_tokens": 300, "generated_tokens": 6},
                             srn: {"rows": 3, "prompt_tokens": 100, "generated_tokens": 54}},
              padded=500, prefill=4.0, decode=6.0, io_wait=1.0, wall=12.0,
              peak={"gpu": 2 * GIB, "cpu": 5 * GIB, "disk": 0}),
        batch("fp16", "b1", {srn: {"rows": 3, "prompt_tokens": 60, "generated_tokens": 30},
                             xsum: {"rows": 2, "prompt_tokens": 140, "generated_tokens": 30}},
              padded=250, prefill=2.0, decode=3.0, io_wait=0.5, wall=6.0,
              peak={"gpu": 3 * GIB, "cpu": 4 * GIB, "disk": 1 * GIB}),
    ], garbage=True)
    return suite


def row(df, suite, sub):
    r = df[(df["suite"] == suite) & (df["sub_scenario"] == sub)]
    assert len(r) == 1, (suite, sub, df[["suite", "sub_scenario"]])
    return r.iloc[0]


def stats_mean(run_dir, metric, split):
    for s in json.loads((run_dir / "stats.json").read_text()):
        if s["name"] == {"name": metric, "split": split}:
            return s["mean"]
    raise KeyError(metric)


def test_sub_scenario_key_drops_model_keys():
    assert sub_scenario_of("mmlu:subject=x,method=j,model=meta_opt-30b,model_deployment=flexgen_opt-30b-4bit") \
        == "mmlu:subject=x,method=j"
    assert sub_scenario_of("wikitext_103:model=a_b") == "wikitext_103"
    assert sub_scenario_of("wikifact:k=5,subject=p,max_eval_instances=96,model=a_b") == "wikifact:k=5,subject=p"


def test_metrics_equal_the_run_files(tmp_path):
    suite = make_fp16(tmp_path)
    df = summary_table([load_suite(tmp_path, "fp16")])
    mmlu_dir = suite / run_name(suite, MMLU)

    r = row(df, "fp16", MMLU)
    test_em = [MMLU_EM[i] for i in MMLU_EM if MMLU_SPLIT[i] == "test"]
    assert (r.main_metric, r.main_split) == ("exact_match", "test")   # HELM's schema for the mmlu group
    assert r.score == stats_mean(mmlu_dir, "exact_match", "test") == pytest.approx(statistics.mean(test_em))
    assert r.stderr == pytest.approx(statistics.stdev(test_em) / math.sqrt(len(test_em)))
    assert r.n_main == 4 and r.instances == 6
    assert f"quasi_exact_match={stats_mean(mmlu_dir, 'quasi_exact_match', 'test'):.4g}" in r.other_metrics
    assert r.status == "ok"

    r = row(df, "fp16", SRN)  # most specific group wins; two trials average to the same per-instance values
    assert r.main_metric == "f1_set_match"
    assert r.score == pytest.approx(statistics.mean(SRN_F1.values()))
    assert r.stderr == pytest.approx(statistics.stdev(SRN_F1.values()) / math.sqrt(3))
    assert r.n_main == 3

    r = row(df, "fp16", XSUM)  # plugin group unknown to HELM's schema: falls back to a metric it has
    assert r.main_metric == "rouge_l" and r.score == pytest.approx(0.2)


def test_timing_is_apportioned_by_token_share(tmp_path):
    make_fp16(tmp_path)
    data = load_suite(tmp_path, "fp16")
    df = summary_table([data])
    assert any("1 unreadable line" in n for n in data.notes)

    m = row(df, "fp16", MMLU)   # b0 only: 300 of 400 prompt tokens, 6 of 60 generated, 306 of 460 tokens
    assert m.prompt_tokens == 300 and m.generated_tokens == 6 and m.batches == 1
    assert m.prefill_s == pytest.approx(4.0 * 300 / 400)
    assert m.decode_s == pytest.approx(6.0 * 6 / 60)
    assert m.wall_s == pytest.approx(m.prefill_s + m.decode_s + (12.0 - 10.0) * 306 / 460)
    assert m.io_wait_s == pytest.approx(1.0 * 306 / 460)
    assert m.padded_prompt_tokens == pytest.approx(500 * 300 / 400)
    assert m.padding_efficiency == pytest.approx(400 / 500)
    assert m.prefill_tok_s == pytest.approx(300 / 3.0) and m.decode_tok_s == pytest.approx(6 / 0.6)
    assert m.gen_tok_s == pytest.approx(6 / 3.6)
    assert (m.peak_gpu_GB, m.peak_cpu_GB, m.peak_disk_GB) == (2 * GIB / 1e9, 5 * GIB / 1e9, 0.0)
    assert m.policy == "8x2 w 20/80/0 kv 0/100/0 act 0/100/0" and m.compressed == "no"

    s = row(df, "fp16", SRN)    # in both batches
    assert s.prompt_tokens == 160 and s.generated_tokens == 84 and s.batches == 2
    assert s.prefill_s == pytest.approx(4.0 * 100 / 400 + 2.0 * 60 / 200)
    assert s.decode_s == pytest.approx(6.0 * 54 / 60 + 3.0 * 30 / 60)
    assert s.wall_s == pytest.approx(s.prefill_s + s.decode_s + 2.0 * 154 / 460 + 1.0 * 90 / 260)
    assert s.padded_prompt_tokens == pytest.approx(500 * 100 / 400 + 250 * 60 / 200)
    assert (s.peak_gpu_GB, s.peak_cpu_GB, s.peak_disk_GB) == (3 * GIB / 1e9, 5 * GIB / 1e9, 1 * GIB / 1e9)
    # all of each batch is accounted for exactly once
    assert df["wall_s"].sum() == pytest.approx(18.0) and df["prefill_s"].sum() == pytest.approx(6.0)


def test_gaps_are_marked_not_fatal(tmp_path):
    make_fp16(tmp_path)
    int4 = tmp_path / "runs" / "int4"
    write_run(int4, MMLU, ["mmlu"], {i: {"exact_match": 0.0} for i in MMLU_EM}, MMLU_SPLIT,
              {i: "B" for i in MMLU_EM}, deployment="flexgen/opt-1.3b-4bit")
    write_run(int4, SRN, ["synthetic_reasoning", "synthetic_reasoning_natural"],
              {i: {"f1_set_match": v} for i, v in SRN_F1.items()}, SRN_SPLIT, {i: "x" for i in SRN_F1},
              omit=("per_instance_stats.json",))
    df = summary_table([load_suite(tmp_path, "fp16"), load_suite(tmp_path, "int4")])

    assert row(df, "fp16", WIKI).status.startswith("GAP: run failed")
    assert math.isnan(row(df, "fp16", WIKI).score)
    assert row(df, "int4", XSUM).status == "GAP: not run in this suite"
    assert row(df, "int4", WIKI).status == "GAP: not run in this suite"
    partial = row(df, "int4", SRN)   # score still from stats.json, no standard error without instances
    assert partial.status.startswith("ok") and "partial run: missing per_instance_stats.json" in partial.status
    assert partial.score == pytest.approx(statistics.mean(SRN_F1.values())) and math.isnan(partial.stderr)
    assert all("no timing log" in row(df, "int4", sub).status for sub in (MMLU, SRN))
    assert math.isnan(row(df, "int4", MMLU).wall_s)


def test_malformed_files_become_notes(tmp_path):
    suite = make_fp16(tmp_path)
    run_dir = suite / run_name(suite, MMLU)
    (run_dir / "stats.json").write_text('[{"unexpected": 1}]')
    (run_dir / "per_instance_stats.json").write_text('[{"instance_id": "i0", "stats": [{"na')   # cut off
    (run_dir / "run_spec.json").write_text("[]")
    r = row(summary_table([load_suite(tmp_path, "fp16")]), "fp16", MMLU)
    assert r.status.startswith("GAP") and "malformed stats.json" in r.status
    assert "unreadable per_instance_stats.json" in r.status and "malformed run_spec.json" in r.status


def test_timing_only_run_and_schema_override(tmp_path):
    suite = make_fp16(tmp_path)
    log = suite / "flexgen_timing.jsonl"
    extra = batch("fp16", "b2", {"mmlu:subject=us_foreign_policy,model=meta_opt-1.3b": {
        "rows": 1, "prompt_tokens": 10, "generated_tokens": 1}}, padded=10, prefill=1.0, decode=1.0, io_wait=0.0,
        wall=2.0, peak={"gpu": 0, "cpu": 0, "disk": 0})
    log.write_text(log.read_text() + json.dumps(extra) + "\n")
    # helm-summarize's schema.json names the main metric when present
    (suite / "schema.json").write_text(json.dumps({"run_groups": [
        {"name": "mmlu", "environment": {"main_name": "quasi_exact_match", "main_split": "test"}}]}))
    df = summary_table([load_suite(tmp_path, "fp16")])
    r = row(df, "fp16", "mmlu:subject=us_foreign_policy")
    assert r.status.startswith("GAP") and "no run folder" in r.status and r.wall_s == pytest.approx(2.0)
    r = row(df, "fp16", MMLU)
    assert r.main_metric == "quasi_exact_match" and r.score == pytest.approx(1.0)


def test_unknown_suite_is_a_config_error(tmp_path):
    make_fp16(tmp_path)
    with pytest.raises(ReportError, match="suites under .*fp16") as e:
        load_suite(tmp_path, "nope")
    assert isinstance(e.value, ConfigError)
