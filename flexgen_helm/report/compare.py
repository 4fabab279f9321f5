"""Paired comparison of two suites (e.g. fp16 against 4-bit) on the instances both ran."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .load import ReportError, SuiteData
from .paper import paper_order

COMPARE_COLUMNS = ["base", "other", "sub_scenario", "main_metric", "n_shared", "base_score", "other_score",
                   "delta", "ci_low", "ci_high", "significant", "changed_share", "n_changed_compared", "note"]


@dataclass(frozen=True)
class Bootstrap:
    delta: float      # mean(other - base) over the shared instances
    low: float
    high: float
    n: int            # shared instances

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(base: pd.Series, other: pd.Series, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Bootstrap:
    """Percentile CI of the mean per-instance difference, resampling instances (not runs) with replacement.

    Pairing matters: instance difficulty varies far more than the fp16/4-bit effect, so resampling the
    two suites independently would drown the effect in between-instance noise.
    """
    shared = base.index.intersection(other.index)
    if len(shared) == 0:
        raise ReportError("the two runs share no instances, so no paired comparison is possible "
                          "(run both suites on the same conf with the same -m)")
    diff = (other.loc[shared].to_numpy(float) - base.loc[shared].to_numpy(float))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Bootstrap(float(diff.mean()), float(low), float(high), len(diff))


def changed_share(base: dict[str, tuple[str, ...]] | None, other: dict[str, tuple[str, ...]] | None,
                  ids: pd.Index) -> tuple[float, int]:
    """Share of the given instances whose completions differ between the suites, and how many were compared."""
    if base is None or other is None:
        return math.nan, 0
    both = [i for i in ids if i in base and i in other]
    if not both:
        return math.nan, 0
    return sum(base[i] != other[i] for i in both) / len(both), len(both)


def compare_suites(base: SuiteData, other: SuiteData, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per shared sub-scenario: metric delta (other - base) with a paired bootstrap CI; gaps get a note."""
    rows = []
    for sub in sorted(set(base.runs) | set(other.runs), key=paper_order):
        a, b = base.runs.get(sub), other.runs.get(sub)
        row: dict = {"base": base.suite, "other": other.suite, "sub_scenario": sub}
        rows.append(row)
        if a is None or b is None:
            row["note"] = f"GAP: not run in {other.suite if b is None else base.suite}"
            continue
        row["main_metric"] = a.main_metric
        if a.main_metric is None or a.main_metric != b.main_metric or a.main_split != b.main_split:
            row["note"] = f"GAP: main metrics differ or missing ({a.main_metric} vs {b.main_metric})"
            continue
        va, vb = a.instance_values(), b.instance_values()
        try:
            boot = paired_bootstrap(va, vb, n_boot=n_boot, seed=seed)
        except ReportError:
            row["note"] = "GAP: no shared instances" + ("" if len(va) and len(vb) else " (per-instance stats missing)")
            continue
        shared = va.index.intersection(vb.index)
        row.update(n_shared=boot.n, base_score=float(va.loc[shared].mean()), other_score=float(vb.loc[shared].mean()),
                   delta=boot.delta, ci_low=boot.low, ci_high=boot.high, significant=boot.excludes_zero)
        row["changed_share"], row["n_changed_compared"] = changed_share(a.predictions, b.predictions, shared)
        notes = []
        if boot.n < max(len(va), len(vb)):
            notes.append(f"only {boot.n} of {max(len(va), len(vb))} instances shared")
        if row["n_changed_compared"] == 0:
            notes.append("no scenario_state to compare predictions")
        row["note"] = "; ".join(notes)
    df = pd.DataFrame(rows).reindex(columns=COMPARE_COLUMNS)
    if not df["n_shared"].fillna(0).astype(int).gt(0).any():
        raise ReportError(f"suites {base.suite!r} and {other.suite!r} share no instances in any sub-scenario "
                          "(were they run on the same conf with the same -m?)")
    return df
