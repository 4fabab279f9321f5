"""Assemble a report folder: CSV/Markdown tables, PNG plots and one self-contained HTML page."""
from __future__ import annotations

import html as _html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import plots
from .compare import compare_suites
from .html import html_page, summary_view, to_html_table, to_markdown
from .load import SuiteData, load_suite
from .paper import load_predictions, paper_table
from .tables import metrics_table, summary_table


@dataclass
class Report:
    suites: list[SuiteData]
    summary: pd.DataFrame
    comparisons: pd.DataFrame | None
    paper: pd.DataFrame
    files: list[Path]


def build_report(output_path: str | Path, suite: str, compare: list[str] | None, out: str | Path,
                 predicted: str | Path | None = None, n_boot: int = 2000, seed: int = 0) -> Report:
    """Read the suites under `output_path`/runs and write the report into `out`; return the tables too."""
    names = [suite] + [c for c in (compare or []) if c != suite]
    suites = [load_suite(output_path, n) for n in names]
    summary = summary_table(suites)
    comparisons = (pd.concat([compare_suites(suites[0], s, n_boot=n_boot, seed=seed) for s in suites[1:]],
                             ignore_index=True) if len(suites) > 1 else None)
    paper = paper_table(summary, load_predictions(predicted))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "summary.csv", out / "summary.md", out / "report.html"]
    summary.to_csv(files[0], index=False)
    paper.to_csv(out / "paper_table.csv", index=False)
    metrics_table(suites).to_csv(out / "metrics.csv", index=False)
    files += [out / "paper_table.csv", out / "metrics.csv"]
    if comparisons is not None:
        comparisons.to_csv(out / "compare.csv", index=False)
        files.append(out / "compare.csv")
    images = [("Accuracy per sub-scenario", plots.accuracy_plot(summary, out / "accuracy.png", comparisons)),
              ("Throughput per sub-scenario", plots.throughput_plot(summary, out / "throughput.png")),
              ("Time breakdown", plots.time_breakdown_plot(summary, out / "time_breakdown.png")),
              ("Paper's 21-hour table vs ours", plots.paper_plot(paper, out / "paper_times.png"))]
    files += [p for _, p in images]

    notes = [f"{s.suite}: {n}" for s in suites for n in s.notes]
    title = f"flexgen-helm report: {', '.join(names)}"
    md = [f"# {title}\n", "Rows marked `GAP` are sub-scenarios that failed, are missing, or lack data; "
          f"`—` is a value that could not be computed.\n"]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md += ["## Summary\n", to_markdown(summary_view(summary))]
    if comparisons is not None:
        md += ["## Comparison (other − base, paired bootstrap 95% CI over shared instances)\n",
               to_markdown(_compare_view(comparisons))]
    md += ["## FlexGen's 21-hour table next to ours\n", to_markdown(paper)]
    files[1].write_text("\n".join(md))

    sections = [("Notes", "<p class=note>Rows tinted red (status <code>GAP</code>) failed, are missing or lack "
                          "data; — marks a value that could not be computed. Score ± one standard error over "
                          "instances of the main split. Batch times are split across sub-scenarios by token "
                          "share.</p>" + "".join(f"<p class=note>{_html.escape(n)}</p>" for n in notes)),
                ("Summary", to_html_table(summary_view(summary), gap_column="status"))]
    if comparisons is not None:
        sections.append(("Comparison (other − base, paired bootstrap 95% CI over shared instances)",
                         to_html_table(_compare_view(comparisons), gap_column="note")))
    sections.append(("FlexGen's 21-hour table next to ours (minutes)", to_html_table(paper)))
    files[2].write_text(html_page(title, sections, images))
    return Report(suites, summary, comparisons, paper, files)


def _compare_view(df: pd.DataFrame) -> pd.DataFrame:
    view = df.drop(columns=["n_changed_compared"]).copy()
    view["significant"] = [s if not isinstance(s, (bool, np.bool_)) else ("yes: CI excludes 0" if s else "no")
                           for s in df["significant"]]
    return view
