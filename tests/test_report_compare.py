"""Suite comparison: paired bootstrap over shared instances, changed predictions, clear failures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flexgen_helm.report.compare import changed_share, compare_suites, paired_bootstrap
from flexgen_helm.report.load import ReportError, load_suite

try:
    from test_report_helmfmt import write_run
except ImportError:
    from tests.test_report_helmfmt import write_run

TASK = "mmlu:subject=abstract_algebra,method=multiple_choice_joint"


def test_bootstrap_pairs_by_instance_id():
    rng = np.random.default_rng(1)
    ids = [f"id{i}" for i in range(40)]
    base = pd.Series(rng.uniform(0, 1, 40), index=ids)     # instance difficulty varies a lot...
    other = (base + 0.05)[::-1]                             # ...the effect is a constant +0.05, order shuffled
    res = paired_bootstrap(base, other, n_boot=500, seed=3)
    assert res.n == 40 and res.delta == pytest.approx(0.05)
    # paired: no between-instance noise left, so the interval collapses onto the effect
    assert res.low == pytest.approx(0.05) and res.high == pytest.approx(0.05) and res.excludes_zero
    # an unpaired resampling of the same data would give a wide interval straddling zero
    a, b = base.to_numpy(), other.to_numpy()
    unpaired = [b[rng.integers(0, 40, 40)].mean() - a[rng.integers(0, 40, 40)].mean() for _ in range(500)]
    assert np.quantile(unpaired, 0.025) < 0 < np.quantile(unpaired, 0.975)


def test_bootstrap_uses_only_shared_instances_and_is_seeded():
    base = pd.Series([1.0, 0.0, 1.0, 0.0, 1.0], index=["a", "b", "c", "d", "e"])
    other = pd.Series([1.0, 1.0, 0.0, 5.0], index=["a", "b", "c", "z"])   # "z" has no partner
    res = paired_bootstrap(base, other, n_boot=1000, seed=7)
    assert res.n == 3 and res.delta == pytest.approx((0 + 1 - 1) / 3)
    assert res.low <= res.delta <= res.high
    assert paired_bootstrap(base, other, n_boot=1000, seed=7) == res
    noisy = pd.Series(np.random.default_rng(0).normal(size=20))
    assert paired_bootstrap(noisy * 0, noisy, seed=1) == paired_bootstrap(noisy * 0, noisy, seed=1)
    assert paired_bootstrap(noisy * 0, noisy, seed=1) != paired_bootstrap(noisy * 0, noisy, seed=2)


def test_bootstrap_without_shared_instances_fails_clearly():
    with pytest.raises(ReportError, match="share no instances"):
        paired_bootstrap(pd.Series([1.0], index=["a"]), pd.Series([1.0], index=["b"]))


def test_changed_share():
    base = {"a": ("A",), "b": ("B",), "c": ("C", "x")}
    other = {"a": ("A",), "b": ("C",), "c": ("C", "y")}
    assert changed_share(base, other, pd.Index(["a", "b", "c"])) == (pytest.approx(2 / 3), 3)
    assert changed_share(None, other, pd.Index(["a"]))[1] == 0


def _suites(tmp_path):
    ids = [f"i{k}" for k in range(30)]
    split = {i: "test" for i in ids}
    fp = {i: float(k % 2) for k, i in enumerate(ids)}
    q4 = {i: (0.0 if k < 10 else fp[i]) for k, i in enumerate(ids)}   # 4-bit loses the first 10 answers
    write_run(tmp_path / "runs" / "fp16", TASK, ["mmlu"], {i: {"exact_match": v} for i, v in fp.items()}, split,
              {i: "A" for i in ids})
    write_run(tmp_path / "runs" / "int4", TASK, ["mmlu"], {i: {"exact_match": v} for i, v in q4.items()}, split,
              {i: ("B" if k < 10 else "A") for k, i in enumerate(ids)}, deployment="flexgen/opt-1.3b-4bit")
    write_run(tmp_path / "runs" / "fp16", "synthetic_reasoning:mode=pattern_match", ["synthetic_reasoning"],
              {"s0": {"quasi_exact_match": 1.0}}, {"s0": "test"}, {"s0": "a"})
    return fp, q4


def test_compare_suites(tmp_path):
    fp, q4 = _suites(tmp_path)
    df = compare_suites(load_suite(tmp_path, "fp16"), load_suite(tmp_path, "int4"), n_boot=800, seed=0)
    r = df[df["sub_scenario"] == TASK].iloc[0]
    diff = np.array([q4[i] - fp[i] for i in fp])
    assert r.main_metric == "exact_match" and r.n_shared == 30
    assert r.base_score == pytest.approx(np.mean(list(fp.values())))
    assert r.other_score == pytest.approx(np.mean(list(q4.values())))
    assert r.delta == pytest.approx(diff.mean()) and r.ci_low <= r.delta <= r.ci_high
    assert bool(r.significant) == (r.ci_high < 0)
    assert r.changed_share == pytest.approx(10 / 30)
    gap = df[df["sub_scenario"] == "synthetic_reasoning:mode=pattern_match"].iloc[0]
    assert gap.note == "GAP: not run in int4" and np.isnan(gap.delta)


def test_compare_with_nothing_shared_fails_clearly(tmp_path):
    write_run(tmp_path / "runs" / "a", TASK, ["mmlu"], {"x": {"exact_match": 1.0}}, {"x": "test"}, {"x": "A"})
    write_run(tmp_path / "runs" / "b", TASK, ["mmlu"], {"y": {"exact_match": 1.0}}, {"y": "test"}, {"y": "A"})
    with pytest.raises(ReportError, match="share no instances in any sub-scenario"):
        compare_suites(load_suite(tmp_path, "a"), load_suite(tmp_path, "b"))
