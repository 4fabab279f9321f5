"""PNG plots of a report. Figures are drawn on the Agg canvas directly (no pyplot), so a report never
needs a display and never disturbs a caller's own matplotlib state."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

DPI = 100
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def _figure(n_rows: int, n_cols: int = 1, width: float = 9.0) -> tuple[Figure, list]:
    height = min(max(2.5, 0.3 * n_rows + 1.5), 40.0)  # capped: a full HELM suite can have hundreds of rows
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, n_cols, i + 1) for i in range(n_cols)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _grouped_barh(ax, labels: list[str], series: dict[str, list[float]], errors: dict[str, list[float]] | None,
                  xlabel: str, hatch_where: dict[str, list[bool]] | None = None, log: bool = False,
                  gap_text: str = "gap", show_values: bool = False,
                  gap_labels: dict[str, list[str]] | None = None) -> None:
    """Horizontal bars, one group per label and one bar per series; a missing value is written as a gap."""
    n = max(len(series), 1)
    height = 0.8 / n
    y = np.arange(len(labels))
    finite = [v for vals in series.values() for v in vals if not math.isnan(v)]
    positive = [v for v in finite if v > 0]
    log = log and bool(positive)
    x_note = min(positive) if log else min([0.0] + finite)
    for k, (name, vals) in enumerate(series.items()):
        pos = y - 0.4 + height * (k + 0.5)
        v = np.array(vals, dtype=float)
        ok = ~np.isnan(v)
        color = COLORS[k % len(COLORS)]
        bars = ax.barh(pos[ok], v[ok], height, color=color, label=name, log=log)
        for bar, hatched in zip(bars, np.array((hatch_where or {}).get(name, [False] * len(v)))[ok]):
            if hatched:
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        if errors is not None:
            e = np.array(errors[name], dtype=float)
            has = ok & ~np.isnan(e)
            ax.errorbar(v[has], pos[has], xerr=e[has], fmt="none", ecolor="black", elinewidth=1, capsize=3)
        if show_values:  # written past the error bar so the two never overlap
            reach = v if errors is None else v + np.nan_to_num(np.array(errors[name], dtype=float))
            for val, x, p in zip(v[ok], reach[ok], pos[ok]):
                ax.text(x, p, f" {val:.3g}", va="center", fontsize=7)
        texts = (gap_labels or {}).get(name, [gap_text] * len(v))
        for p, text in zip(pos[~ok], np.array(texts, dtype=object)[~ok]):
            ax.text(x_note, p, "  " + text, va="center", fontsize=7, color="#aa0000")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    if not log:  # half-width panels crowd five-digit tick labels otherwise
        ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if len(series) > 1 or hatch_where:  # plain swatches: a hatched first bar must not restyle its series
        handles = [Patch(color=COLORS[k % len(COLORS)], label=name) for k, name in enumerate(series)]
        ax.legend(handles=handles, fontsize=8, loc="best")


def _gap_reason(status: object) -> str:
    status = str(status)
    if status.startswith("GAP: not run"):
        return "not run"
    if status.startswith("GAP"):
        return "failed / no data"
    return "no timing log" if "timing" in status else "n/a"


def _pivot(summary: pd.DataFrame, col: str) -> tuple[list[str], dict[str, list[float]], dict[str, list[str]]]:
    """Values of `col` per suite in sub-scenario order, and for each the reason it might be missing."""
    subs = list(dict.fromkeys(summary["sub_scenario"]))
    values: dict[str, list[float]] = {}
    reasons: dict[str, list[str]] = {}
    for suite, s in summary.groupby("suite", sort=False):
        by_sub = dict(zip(s["sub_scenario"], pd.to_numeric(s[col], errors="coerce")))
        why = dict(zip(s["sub_scenario"], s["status"]))
        values[str(suite)] = [float(by_sub.get(sub, math.nan)) for sub in subs]
        reasons[str(suite)] = [_gap_reason(why.get(sub, "GAP: not run")) for sub in subs]
    return subs, values, reasons


def accuracy_plot(summary: pd.DataFrame, path: Path, comparisons: pd.DataFrame | None = None) -> Path:
    """Scores per sub-scenario and suite (± one standard error); with comparisons, a second panel of
    each compared suite's delta against the base suite with its paired bootstrap 95% interval."""
    subs, scores, why = _pivot(summary, "score")
    _, errs, _ = _pivot(summary, "stderr")
    metric = {}
    for sub, m in zip(summary["sub_scenario"], summary["main_metric"]):
        if isinstance(m, str):
            metric.setdefault(sub, m)
    labels = [f"{s}\n[{metric.get(s, '?')}]" for s in subs]
    deltas = comparisons is not None and not comparisons.empty
    fig, axes = _figure(len(subs) * max(1, len(scores)), n_cols=2 if deltas else 1, width=13 if deltas else 9)
    ax = axes[0]
    _grouped_barh(ax, labels, scores, errs, "main metric (error bar: ±1 standard error over instances)",
                  show_values=True, gap_labels=why)
    top = [v + (0 if math.isnan(e) else e) for s in scores for v, e in zip(scores[s], errs[s]) if not math.isnan(v)]
    if top and min(top) >= 0:  # accuracy-type metrics: show the whole 0..1 range so small bars read as small
        ax.set_xlim(0, max(1.0, max(top)) * 1.02)
    ax.set_title("Accuracy per sub-scenario")
    if deltas:
        _delta_panel(axes[1], subs, comparisons)
    return _save(fig, path)


def _delta_panel(ax, subs: list[str], comparisons: pd.DataFrame) -> None:
    """One bar per compared suite and sub-scenario: other − base, with the 95% interval as its error bar."""
    others = list(dict.fromkeys(comparisons["other"]))
    height = 0.8 / (len(others) + 1)  # the score panel's bar height: the base suite plus the others
    y = np.arange(len(subs))
    for k, other in enumerate(others):
        rows = comparisons[comparisons["other"] == other].set_index("sub_scenario")
        pos = y - 0.4 + height * (k + 1.5)  # the score panel's row of the same suite (the base is k = 0)
        for p, sub in zip(pos, subs):
            r = rows.loc[sub] if sub in rows.index else None
            d = math.nan if r is None else float(r["delta"])
            if math.isnan(d):
                ax.text(0, p, "  no paired instances", va="center", fontsize=7, color="#aa0000")
                continue
            lo, hi = float(r["ci_low"]), float(r["ci_high"])
            ax.barh(p, d, height, color=COLORS[(k + 1) % len(COLORS)])
            ax.errorbar(d, p, xerr=[[d - lo], [hi - d]], fmt="none", ecolor="black", elinewidth=1, capsize=3)
            ax.text(max(hi, 0.0), p, f" {d:+.3f} [{lo:+.3f}, {hi:+.3f}]", va="center", fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [""] * len(subs))
    ax.set_ylim(len(subs) - 0.5, -0.5)
    reach = float(np.nanmax(np.abs(comparisons[["ci_low", "ci_high", "delta"]].to_numpy(dtype=float)), initial=0.0))
    reach = max(reach, 0.05)
    ax.set_xlim(-1.2 * reach, 2.6 * reach)  # room on the right for the interval's label
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.grid(axis="x", alpha=0.3)
    base = str(comparisons["base"].iloc[0])
    ax.set_xlabel(f"other − {base} (error bar: paired bootstrap 95% interval)")
    ax.set_title("Change against " + base)


def throughput_plot(summary: pd.DataFrame, path: Path) -> Path:
    subs, pre, why = _pivot(summary, "prefill_tok_s")
    _, dec, _ = _pivot(summary, "decode_tok_s")
    fig, (a1, a2) = _figure(len(subs) * max(1, len(pre)), n_cols=2, width=11)
    _grouped_barh(a1, subs, pre, None, "prefill throughput (prompt tokens / s)", gap_labels=why)
    _grouped_barh(a2, [""] * len(subs), dec, None, "decode throughput (generated tokens / s)", gap_labels=why)
    fig.suptitle("Throughput per sub-scenario (batch times split by token share)")
    return _save(fig, path)


def time_breakdown_plot(summary: pd.DataFrame, path: Path) -> Path:
    """Stacked prefill / decode / rest of wall time; I/O wait is drawn over the stack because the engine
    counts it inside the prefill and decode phases rather than as a phase of its own."""
    df = summary[~summary["status"].astype(str).str.startswith("GAP: not run")]
    labels = [f"{r.suite}: {r.sub_scenario}" for r in df.itertuples()]
    pre, dec, wall, io = (pd.to_numeric(df[c], errors="coerce").to_numpy(float)
                          for c in ("prefill_s", "decode_s", "wall_s", "io_wait_s"))
    rest = np.clip(np.nan_to_num(wall) - np.nan_to_num(pre) - np.nan_to_num(dec), 0, None)
    fig, (ax,) = _figure(len(df))
    y = np.arange(len(df))
    ax.barh(y, np.nan_to_num(pre), 0.6, color=COLORS[0], label="prefill")
    ax.barh(y, np.nan_to_num(dec), 0.6, left=np.nan_to_num(pre), color=COLORS[1], label="decode")
    ax.barh(y, rest, 0.6, left=np.nan_to_num(pre) + np.nan_to_num(dec), color="#bbbbbb", label="other (wall)")
    ax.barh(y, np.nan_to_num(io), 0.25, color="none", edgecolor="black", hatch="xx",
            label="of which I/O wait")
    for i, w in enumerate(wall):
        if math.isnan(w):
            ax.text(0, i, "  gap: no timing", va="center", fontsize=7, color="#aa0000")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Time per sub-scenario")
    return _save(fig, path)


def paper_plot(paper: pd.DataFrame, path: Path) -> Path:
    rows = paper[paper["paper_entry"] != "TOTAL"]
    entries = list(dict.fromkeys(rows["paper_entry"]))
    series: dict[str, list[float]] = {"paper (OPT-IML-30B, T4)": [float(v) for v in
                                                                    rows.drop_duplicates("paper_entry")["paper_min"]]}
    hatch: dict[str, list[bool]] = {}
    gaps: dict[str, list[str]] = {}
    for suite, s in rows.groupby("suite", sort=False):
        by = {r.paper_entry: r for r in s.itertuples()}
        series[f"ours: {suite}"] = [float(by[e].ours_min) if e in by else math.nan for e in entries]
        hatch[f"ours: {suite}"] = [e in by and by[e].source.startswith("predicted") for e in entries]
        gaps[f"ours: {suite}"] = [by[e].source if e in by else "not run" for e in entries]
    fig, (ax,) = _figure(len(entries) * len(series))
    _grouped_barh(ax, entries, series, None, "minutes at the paper's instance count (log scale; hatched = predicted)",
                  hatch_where=hatch if any(any(h) for h in hatch.values()) else None, log=True,
                  gap_labels=gaps)
    ax.set_title("FlexGen's 21-hour HELM table next to ours")
    return _save(fig, path)
