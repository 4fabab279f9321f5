"""The summary table: one row per (suite, sub-scenario), gaps included."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .load import OTHER_METRICS, RunData, SuiteData
from .paper import paper_order

GB = 1e9
SUMMARY_COLUMNS = [
    "suite", "sub_scenario", "run", "status", "main_metric", "main_split", "score", "stderr", "n_main",
    "instances", "other_metrics", "batches", "prompt_tokens", "generated_tokens", "padded_prompt_tokens",
    "padding_efficiency", "wall_s", "prefill_s", "decode_s", "io_wait_s", "prefill_tok_s", "decode_tok_s",
    "gen_tok_s", "policy", "compressed", "peak_gpu_GB", "peak_cpu_GB", "peak_disk_GB",
]


def _norm(name: str | None) -> str:
    return (name or "").replace("/", "_")


def stderr_of(values: pd.Series) -> float:
    """Standard error of the mean over instances (sample std / sqrt(n)); NaN below two instances."""
    n = len(values)
    return float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def _metric_row(run: RunData) -> dict:
    row: dict = {"main_metric": run.main_metric, "main_split": run.main_split}
    notes = list(run.notes)
    values = run.instance_values()
    score = run.stat_mean(run.main_metric, run.main_split) if run.main_metric else math.nan
    if math.isnan(score) and len(values):
        score = float(values.mean())
        notes.append("score from per-instance stats (absent in stats.json)")
    row["score"] = score
    row["stderr"] = stderr_of(values)
    row["n_main"] = len(values) if run.per_instance is not None else np.nan
    row["instances"] = run.per_instance["instance_id"].nunique() if run.per_instance is not None else np.nan
    others = []
    for m in OTHER_METRICS:
        if m != run.main_metric and run.main_metric:
            v = run.stat_mean(m, run.main_split)
            if not math.isnan(v):
                others.append(f"{m}={v:.4g}")
    row["other_metrics"] = "; ".join(others)
    if run.run_spec is not None and run.main_metric is None and run.stats is not None:
        notes.append("no accuracy metric found")
    row["_notes"] = notes
    return row


def _timing_row(run: RunData, timing: pd.DataFrame | None) -> dict:
    row: dict = {}
    if timing is None:
        return row
    names = {_norm(run.name), _norm((run.run_spec or {}).get("name"))}
    t = timing[timing["run"].map(_norm).isin(names)]
    if t.empty:
        row["_notes"] = ["not in the timing log"]
        return row
    sums = {c: float(t[c].sum()) for c in ("prompt_tokens", "generated_tokens", "padded_prompt_tokens",
                                          "wall_s", "prefill_s", "decode_s", "io_wait_s")}
    row.update(sums)
    row["batches"] = t["batch_id"].nunique()
    row["padding_efficiency"] = _ratio(sums["prompt_tokens"], sums["padded_prompt_tokens"])
    row["prefill_tok_s"] = _ratio(sums["prompt_tokens"], sums["prefill_s"])
    row["decode_tok_s"] = _ratio(sums["generated_tokens"], sums["decode_s"])
    # FlexGen's headline throughput: generated tokens over prefill + decode time
    row["gen_tok_s"] = _ratio(sums["generated_tokens"], sums["prefill_s"] + sums["decode_s"])
    row["policy"] = " | ".join(dict.fromkeys(p for p in t["policy"] if p))
    flags = [f for f, on in (("weights", t["compress_weight"].any()), ("cache", t["compress_cache"].any())) if on]
    row["compressed"] = "4-bit " + "+".join(flags) if flags else "no"
    for tier in ("gpu", "cpu", "disk"):
        row[f"peak_{tier}_GB"] = float(t[f"peak_{tier}"].max()) / GB
    return row


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def summary_table(suites: list[SuiteData]) -> pd.DataFrame:
    """One row per (suite, sub-scenario) over the union of sub-scenarios; a gap's status says why."""
    subs = sorted(dict.fromkeys(s for suite in suites for s in suite.runs), key=paper_order)
    rows = []
    for suite in suites:
        for sub in subs:
            run = suite.runs.get(sub)
            row: dict = {"suite": suite.suite, "sub_scenario": sub}
            if run is None:
                row["run"] = ""
                row["status"] = "GAP: not run in this suite"
                rows.append(row)
                continue
            row["run"] = run.name
            m, t = _metric_row(run), _timing_row(run, suite.timing)
            notes = m.pop("_notes") + t.pop("_notes", [])
            row.update(m)
            row.update(t)
            if suite.timing is None:
                notes.append("no timing log")
            gap = run.main_metric is None or math.isnan(row.get("score", math.nan))
            row["status"] = ("GAP: " if gap else "ok" + ("; " if notes else "")) + "; ".join(notes)
            if gap and not notes:
                row["status"] += "no metric"
            rows.append(row)
    return pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)


def metrics_table(suites: list[SuiteData]) -> pd.DataFrame:
    """Every unperturbed aggregate stat of every run, long format, exactly as stats.json has it."""
    rows = [(suite.suite, run.sub_scenario, s["name"]["name"], s["name"].get("split"), s["mean"])
            for suite in suites for run in suite.runs.values() for s in run.stats or []
            if "perturbation" not in s["name"] and "sub_split" not in s["name"] and s.get("count", 0) > 0]
    return pd.DataFrame(rows, columns=["suite", "sub_scenario", "metric", "split", "value"])
