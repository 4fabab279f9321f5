"""scripts/cuda_acceptance.py, the one prepared run for a short GPU lease: every phase's command is one
`flexgen-helm bench` accepts, and the phases run end to end (tiny sizes, on the CPU) into a summary
that keeps what each finished."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from flexgen_helm.cli import build_parser

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "cuda_acceptance.py")


def _script():
    spec = importlib.util.spec_from_file_location("cuda_acceptance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("smoke", [False, True])
def test_every_phase_is_a_command_the_cli_accepts(smoke):
    acc = _script()
    todo = acc.phases(smoke, "cuda")
    assert len({p.name for p in todo}) == len(todo)
    assert todo[0].kind == "pytest"  # correctness first, while the lease is fresh
    for ph in todo:
        if ph.kind == "bench":
            args = build_parser().parse_args(acc.command(ph, "cuda", "W", "J")[3:])
            assert args.device == "cuda" and args.json == "J" and args.offload_dir == "W"
        else:
            assert all(os.path.exists(a.split("::")[0]) for a in ph.args if a.startswith("tests/"))


def test_phases_run_and_a_phase_past_the_deadline_is_skipped(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--device", "cpu", "--smoke",
                        "--phases", "q1,p2,opt13", "--deadline-s", "200", "--work-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "acceptance.json").read_text())
    q1, p2, opt13 = s["phases"]
    assert q1["status"] == "ok" and q1["headline"]["speedup_vs_baseline"] > 0
    assert q1["result"]["policy"]["compress_weight"] and q1["headline"]["weight_bytes"] > 0
    assert p2["status"] == "ok" and 0 < p2["headline"]["disk_bytes_ratio"] < 0.35
    assert 0 < p2["headline"]["fraction_of_bound"]
    assert opt13["status"].startswith("skipped") and "result" not in opt13  # its estimate did not fit
    assert s["machine"]["torch"] and s["total_s"] > 0
    assert "=== q1" in (out / "acceptance.log").read_text()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the offload folder is gone
