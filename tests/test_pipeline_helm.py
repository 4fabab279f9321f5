"""`torchrun --nproc-per-node 2 -m flexgen_helm run ...` (rank 0 runs HELM, rank 1 serves its
stage) gives the same HELM runs as the single-process `flexgen-helm run`."""
from __future__ import annotations

import json
import os

import pytest

from test_helm_e2e import BIN, TIMING_STATS, flexgen_run, load_runs, make_env, sh

pytestmark = pytest.mark.slow


def test_torchrun_helm_equals_single_process(tiny_opt, tmp_path):
    single = make_env(str(tmp_path / "single"), tiny_opt)
    piped = make_env(str(tmp_path / "piped"), tiny_opt)
    sh(flexgen_run(single), single)
    cmd = flexgen_run(piped)
    sh([os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--master-port", "29731", "-m", "flexgen_helm",
        *cmd[1:]], piped, timeout=600)
    with open(os.path.join(piped["out"], "runs", "s", "flexgen_helm_run.log")) as f:
        assert "pipeline of 2 stages: stage 0: layers 0-0 + embed; stage 1: layers 1-1 + head" in f.read()
    ref, got = load_runs(single), load_runs(piped)
    assert sorted(got) == sorted(ref) and len(ref) == 2
    for name, r in ref.items():
        assert got[name]["texts"] == r["texts"]
        assert got[name]["logprobs"] == r["logprobs"]  # fp32, same micro-batches: identical
        for key, value in r["stats"].items():
            if json.loads(key)["name"] not in TIMING_STATS:
                assert got[name]["stats"][key] == value, (name, key)
