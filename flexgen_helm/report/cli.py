"""`flexgen-helm report`: tables and plots of one suite, or of several compared against the first."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="accuracy and timing tables/plots of HELM suites (fp16 vs 4-bit comparison)",
        description="Read HELM run folders and the flexgen timing log of a suite and write summary.csv, "
                    "summary.md, report.html and PNG plots. With --compare, each further suite is compared "
                    "against --suite on shared instances (paired bootstrap).")
    p.add_argument("--suite", required=True, help="base suite (benchmark_output/runs/<suite>)")
    p.add_argument("--compare", nargs="+", default=[], metavar="SUITE",
                   help="suites to compare against --suite, e.g. the 4-bit run")
    p.add_argument("--output-path", default="benchmark_output", help="HELM output folder (default: %(default)s)")
    p.add_argument("--out", required=True, help="report folder to write, e.g. reports/<name>")
    p.add_argument("--predicted", default=None, metavar="JSON",
                   help='predicted times for sub-scenarios not run: {"sub_scenarios": [{"name": ..., '
                        '"predicted_s": ...}]} (e.g. from the policy search)')
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .build import build_report  # pandas/matplotlib only when the command runs

    report = build_report(args.output_path, args.suite, args.compare, args.out, predicted=args.predicted,
                          n_boot=args.bootstrap, seed=args.seed)
    gaps = int(report.summary["status"].astype(str).str.startswith("GAP").sum())
    print(f"report: {len(report.summary)} row(s), {gaps} gap(s); wrote {len(report.files)} files to {args.out}")
    for f in report.files:
        print(f"  {f}")
    return 0
