"""Trivial baselines on exactly the test instances a demo run evaluated, for the report.

For each synthetic-reasoning run of a suite: the HELM main-metric score of always giving the most
frequent answer of HELM's train split, and of copying the last listed rule (pattern_match) or the
last rule's consequent (natural), over the run's `test` instances (from its instances.json).

    python scripts/demo_baselines.py --run-dir demo_report/runs/demo --csv reports/demo/baselines.csv
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os

from flexgen_helm.demo_tasks import TASKS, Example, baselines, helm_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a suite's runs folder, e.g. demo_output/runs/demo")
    ap.add_argument("--csv", required=True)
    args = ap.parse_args()
    rows = []
    for task in (t for t in TASKS.values() if t.max_rules is None):  # curriculum variants share a run spec
        for run in sorted(glob.glob(os.path.join(args.run_dir, task.run_spec + ",*"))):
            with open(os.path.join(run, "instances.json")) as f:
                test = [Example(i["input"]["text"], i["references"][0]["output"]["text"])
                        for i in json.load(f) if i["split"] == "test"]
            base = baselines(task.name, list(helm_split(task.name, "train")), test)
            rows.append({"sub_scenario": task.run_spec, "metric": task.metric, "n": len(test),
                         "most_frequent_answer": base["most_frequent"], "copy_last_rule": base["copy_last"]})
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
