"""Place the offline STAND-IN data where HELM looks (`<output>/scenarios/<name>/data/`).

HELM only downloads a scenario's files when they are missing, so placed files are used as-is.
Each placed scenario gets a marker file, `flexgen-helm run` warns while one is present, and real
data already in place is never overwritten.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from importlib import resources

from .batch_run import STANDIN_MARKER

SCENARIOS = ("mmlu", "wikifact", "summarization")
_NOTE = ("STAND-IN DATA placed by flexgen-helm for offline runs: self-made synthetic examples in HELM's file\n"
         "format, NOT the real benchmark. Scores computed on it mean nothing. Delete this directory to let\n"
         "HELM download the real data.\n")


def _source(name: str):
    return resources.files("flexgen_helm.helm").joinpath("data", "standins", name)


def place_standins(output_path: str) -> dict[str, str]:
    """Returns {scenario: "placed" | "already placed" | "real data present, left alone"}."""
    status = {}
    for name in SCENARIOS:
        dest = os.path.join(output_path, "scenarios", name)
        marker = os.path.join(dest, STANDIN_MARKER)
        if os.path.exists(marker):
            status[name] = "already placed"
            continue
        if os.path.exists(os.path.join(dest, "data")):
            status[name] = "real data present, left alone"
            continue
        with resources.as_file(_source(name)) as src:
            shutil.copytree(os.path.join(src, "data"), os.path.join(dest, "data"))
        if name == "summarization":  # HELM reads a pickle; it ships as JSON (text in the repo)
            js = os.path.join(dest, "data", "xsum-sampled.json")
            with open(js) as f, open(os.path.join(dest, "data", "xsum-sampled.pk"), "wb") as out:
                pickle.dump(json.load(f), out)
            os.remove(js)
        with open(marker, "w") as f:
            f.write(_NOTE)
        status[name] = "placed"
    return status
