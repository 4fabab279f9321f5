"""FlexGen's "7 sub-scenarios in 21 hours" table, and ours next to it (measured, or predicted).

Paper setting: OPT-IML-30B on one T4 (16 GB) with 208 GB DRAM; times are wall minutes with all overhead.
Predicted times come from an optional JSON file, e.g. written by the policy search:

    {"sub_scenarios": [{"name": "mmlu:subject=abstract_algebra", "predicted_s": 1800.0, "instances": 100}]}

`name` is matched like a run name (scenario plus a subset of its arguments); `instances` (optional) is the
instance count the prediction is for, and defaults to the paper's count.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .load import ReportError, split_run_name


@dataclass(frozen=True)
class PaperRow:
    entry: str        # HELM description without model keys
    instances: int
    minutes: float


PAPER_ROWS = (
    PaperRow("wikifact:k=5,subject=plaintiff", 96, 10),
    PaperRow("wikifact:k=5,subject=instance_of", 850, 55),
    PaperRow("mmlu:subject=abstract_algebra", 100, 31),
    PaperRow("mmlu:subject=us_foreign_policy", 100, 33),
    PaperRow("synthetic_reasoning:mode=pattern_match", 515, 118),
    PaperRow("synthetic_reasoning_natural:difficulty=easy", 515, 100),
    PaperRow("summarization_xsum_sampled:temperature=0.3", 518, 902),
)
PAPER_COLUMNS = ["paper_entry", "suite", "paper_instances", "paper_min", "instances", "measured_min",
                 "ours_min", "source"]


def matches(entry: str, name: str) -> bool:
    """Does a run (or prediction) name stand for this paper entry?

    Same scenario and the entry's arguments among the run's; XSUM rows match any scenario named *xsum*
    because offline runs score XSUM through a project run spec with its own name and arguments.
    """
    e_scn, e_args = split_run_name(entry)
    scn, args = split_run_name(name)
    if "xsum" in e_scn:
        return "xsum" in scn
    return scn == e_scn and all(args.get(k) == v for k, v in e_args.items())


def paper_order(sub: str) -> tuple[int, str]:
    """Sort key: the paper's sub-scenarios first, in its order; then the rest by name."""
    return next((i for i, r in enumerate(PAPER_ROWS) if matches(r.entry, sub)), len(PAPER_ROWS)), sub


def load_predictions(path: str | Path | None) -> dict[str, float]:
    """Predicted seconds per paper entry, scaled to the paper's instance count."""
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
        items = [(str(s["name"]), float(s["predicted_s"]), s.get("instances")) for s in raw["sub_scenarios"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ReportError(f"cannot read predictions {path}: {e}; expected "
                          '{"sub_scenarios": [{"name": "...", "predicted_s": 123.0}]}') from e
    out = {}
    for row in PAPER_ROWS:
        for name, secs, inst in items:
            if matches(row.entry, name):
                out[row.entry] = secs * (row.instances / float(inst) if inst else 1.0)
                break
    return out


def paper_table(summary: pd.DataFrame, predicted: dict[str, float]) -> pd.DataFrame:
    """Paper minutes next to ours per suite: measured where run (scaled linearly to the paper's instance
    count, since a demo runs far fewer instances), predicted otherwise, and a gap where neither exists."""
    rows = []
    suites = list(dict.fromkeys(summary["suite"])) if len(summary) else []
    for suite in suites:
        s = summary[summary["suite"] == suite]
        for row in PAPER_ROWS:
            hit = s[s["sub_scenario"].map(lambda n: matches(row.entry, n))
                    & ~s["status"].astype(str).str.startswith("GAP: not run")]
            why = "" if hit.empty else ("run failed" if str(hit.iloc[0]["status"]).startswith("GAP")
                                        else "run had no timing")
            out = {"paper_entry": row.entry, "suite": suite, "paper_instances": row.instances,
                   "paper_min": row.minutes, "instances": math.nan, "measured_min": math.nan,
                   "ours_min": math.nan, "source": "not run"}
            measured = hit.dropna(subset=["wall_s"]) if "wall_s" in hit else hit.iloc[:0]
            if len(measured):
                m = measured.iloc[0]
                n = float(m["instances"])
                out["instances"], out["measured_min"] = n, m["wall_s"] / 60
                if n > 0:
                    out["ours_min"] = out["measured_min"] * row.instances / n
                    out["source"] = "measured" if n == row.instances else f"measured on {int(n)}, scaled"
                else:  # no per-instance stats, so no count to scale by
                    out["ours_min"], out["source"] = out["measured_min"], "measured, not scaled"
            elif row.entry in predicted:
                out["ours_min"] = predicted[row.entry] / 60
                out["source"] = f"predicted ({why})" if why else "predicted"
            elif why:
                out["source"] = why
            rows.append(out)
        total = {"paper_entry": "TOTAL", "suite": suite, "paper_instances": sum(r.instances for r in PAPER_ROWS),
                 "paper_min": sum(r.minutes for r in PAPER_ROWS), "instances": math.nan, "measured_min": math.nan,
                 "ours_min": math.nan, "source": ""}
        mine = [r for r in rows if r["suite"] == suite]
        if all(not math.isnan(r["ours_min"]) for r in mine):
            total["ours_min"] = sum(r["ours_min"] for r in mine)
            total["source"] = "sum"
        else:
            total["source"] = f"incomplete: {sum(math.isnan(r['ours_min']) for r in mine)} sub-scenario(s) missing"
        rows.append(total)
    return pd.DataFrame(rows).reindex(columns=PAPER_COLUMNS)
