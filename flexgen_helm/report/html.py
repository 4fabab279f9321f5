"""Markdown and self-contained HTML renderings of the report tables (plots embedded as base64 PNGs)."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

GAP_MARK = "—"

# Columns shown in summary.md / report.html (summary.csv keeps all of them at full precision).
SUMMARY_VIEW = {
    "suite": "suite", "sub_scenario": "sub-scenario", "status": "status", "main_metric": "metric",
    "score_se": "score ± s.e.", "n_main": "n", "instances": "inst.", "prompt_tokens": "prompt tok",
    "generated_tokens": "gen tok", "padding_efficiency": "pad eff.", "wall_s": "wall s",
    "prefill_tok_s": "prefill tok/s", "decode_tok_s": "decode tok/s", "policy": "policy (gbs×ngb, % gpu/cpu/disk)",
    "peak_gpu_GB": "GPU GB", "peak_cpu_GB": "CPU GB", "peak_disk_GB": "disk GB",
}


def cell(v: object) -> str:
    """One table cell: gaps as a dash, small floats to 4 significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return GAP_MARK
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):  # counts and rates >= 1000 in plain digits; 1.171e+04 reads badly in a table
        return f"{v:.0f}" if abs(v) >= 1000 or v.is_integer() else f"{v:.4g}"
    return str(v)


def summary_view(summary: pd.DataFrame) -> pd.DataFrame:
    df = summary.copy()
    df["score_se"] = [GAP_MARK if isinstance(s, float) and math.isnan(s) else
                      (f"{s:.4g}" + ("" if math.isnan(e) else f" ± {e:.2g}"))
                      for s, e in zip(pd.to_numeric(df["score"]), pd.to_numeric(df["stderr"]))]
    return df[list(SUMMARY_VIEW)].rename(columns=SUMMARY_VIEW)


def to_markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def to_html_table(df: pd.DataFrame, gap_column: str | None = None) -> str:
    """A plain table; rows whose `gap_column` starts with 'GAP' are tinted so gaps cannot be missed."""
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns) + "</tr>"]
    for row in df.itertuples(index=False):
        values = dict(zip(df.columns, row))
        gap = gap_column is not None and str(values.get(gap_column, "")).startswith("GAP")
        out.append(f"<tr{' class=gap' if gap else ''}>" +
                   "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:12px;margin-bottom:1.5em}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0} tr.gap td{background:#fde8e8;color:#900} img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:13px}"""


def html_page(title: str, sections: list[tuple[str, str]], images: list[tuple[str, Path]]) -> str:
    """One page, no external files: `sections` are (heading, html body); images are read and inlined."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{body}")
    parts.append("<h2>Plots</h2>")
    for caption, path in images:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' "
                     f"src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
