"""Scale-out end to end on the tiny model, offline, no Slurm installed: fake sbatch/scontrol/scancel
(tests/fake_slurm) run each job locally. `--slurm --shards 3` must give the same run folders and
metrics as one unsharded run; a shard killed mid-run is resubmitted and redoes only its uncommitted
batches; Ctrl-C cancels every job; `--workers 2` equals one worker."""
from __future__ import annotations

import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from test_helm_e2e import BIN, LOGPROB_STATS, TIMING_STATS, load_runs, make_env, sh

FAKE_SLURM = os.path.join(os.path.dirname(__file__), "fake_slurm")
CONF = """entries: [
  {description: "synthetic_reasoning:mode=pattern_match,max_eval_instances=3", priority: 1}
  {description: "mmlu:subject=abstract_algebra,max_eval_instances=3", priority: 1}
  {description: "wikifact:k=5,subject=plaintiff,max_eval_instances=3", priority: 1}
]
"""


def env_for(root: str, tiny_opt: str) -> dict:
    env = make_env(root, tiny_opt)
    with open(env["conf"], "w") as f:
        f.write(CONF)
    return env


def run_args(env: dict, *extra: str) -> list[str]:
    return [os.path.join(BIN, "flexgen-helm"), "run", "--conf", env["conf"], "--model", "flexgen/tiny-opt",
            "--suite", "s", "--local-path", env["prod_env"], "-o", env["out"], "--no-progress",
            "--gpu-batch-size", "1", *extra]  # one prompt per batch: a killed shard has committed some, not all


def slurm_env(env: dict, **extra: str) -> dict:
    return {**os.environ, "PATH": FAKE_SLURM + os.pathsep + os.environ["PATH"], "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "FAKE_SLURM_DIR": os.path.join(env["root"], "fake_slurm_state"),
            "OMP_NUM_THREADS": "1", **extra}


def engine_rows(path: str) -> int:
    with sqlite3.connect(path) as db:
        return sum('"engine": "flexgen-helm"' in k for (k,) in db.execute("SELECT key FROM unnamed"))


def assert_same_runs(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for name, r in ref.items():
        assert got[name]["texts"] == r["texts"], name
        for a, b in zip(got[name]["logprobs"], r["logprobs"]):
            assert a == pytest.approx(b, abs=1e-4)
        assert got[name]["stats"].keys() == r["stats"].keys()
        for key, value in r["stats"].items():
            metric = json.loads(key)["name"]
            if metric in LOGPROB_STATS:
                assert got[name]["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
            elif metric not in TIMING_STATS:
                assert got[name]["stats"][key] == value, (name, key)


@pytest.fixture(scope="module")
def reference(tiny_opt, tmp_path_factory):
    env = env_for(str(tmp_path_factory.mktemp("unsharded")), tiny_opt)
    sh(run_args(env), env)
    return load_runs(env)


@pytest.mark.slow  # ~3-6 min on 2 shared cores (4 jobs + helm-summarize)
def test_slurm_three_shards_equal_unsharded_and_a_killed_shard_resumes(reference, tiny_opt, tmp_path):
    env = env_for(str(tmp_path / "slurm"), tiny_opt)
    suite = os.path.join(env["out"], "runs", "s")
    # the largest predicted run spec goes to shard 1: kill that job once its first batch is committed
    kill = f"shard-1-of-3|{os.path.join(suite, 'flexgen_timing.shard-1-of-3.jsonl')}"
    proc = subprocess.run(run_args(env, "--slurm", "--shards", "3", "--poll", "0.5", "--retries", "1",
                                   "--slurm-arg", "time=00:10:00", "--device", "cpu"),
                          cwd=env["root"], capture_output=True, text=True, timeout=600,
                          env=slurm_env(env, FAKE_SLURM_KILL_ONCE=kill))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = os.path.join(env["root"], "fake_slurm_state")
    assert len(glob.glob(os.path.join(state, "*.killed"))) == 1  # the fake really killed a job
    assert "shard 1/3 failed" in proc.stderr and "resubmitting" in proc.stderr
    assert "[slurm] 3/3 done, 0 running, 0 queued, 0 failed" in proc.stderr
    scripts = [open(p).read() for p in sorted(glob.glob(os.path.join(state, "*.sh")))]
    assert len(scripts) == 4  # 3 shards + 1 resubmission
    # --slurm-arg reaches sbatch; a CPU deployment asks for no GPU
    assert all("--shard" in s and "#SBATCH --time" in s and "--gres" not in s for s in scripts)

    # same run folders and metrics as the unsharded run
    assert_same_runs(load_runs(env), reference)

    # the resubmitted shard redid only what the killed attempt had not committed: every batch once
    with open(os.path.join(suite, "flexgen_timing.shard-1-of-3.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    ids = [x["batch_id"] for x in lines]
    assert len(ids) == len(set(ids)) and len(ids) >= 2
    with open(os.path.join(suite, "scaleout", "shard-1-of-3.result.json")) as f:
        result = json.load(f)
    assert 1 <= result["computed_rows"] < sum(x["rows"] for x in lines)

    # shard caches merged into the suite's cache; helm-summarize ran on the union
    assert engine_rows(os.path.join(env["prod_env"], "cache", "flexgen.sqlite")) == 9
    assert os.path.exists(os.path.join(suite, "summary.json"))

    # a shard run again computes nothing: it resumes from its cache
    again = sh(run_args(env, "--shard", "2/3"), env).stdout
    assert "0 rows computed" in again


def test_ctrl_c_cancels_every_job(tiny_opt, tmp_path):
    env = env_for(str(tmp_path / "cancel"), tiny_opt)
    state = os.path.join(env["root"], "fake_slurm_state")
    # the jobs are held (running, never finishing) so that Ctrl-C always finds them in flight
    hold = slurm_env(env, FAKE_SLURM_HOLD=str(tmp_path / "never"))
    proc = subprocess.Popen(run_args(env, "--slurm", "--shards", "3", "--poll", "0.5"), cwd=env["root"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=hold)
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(os.path.join(state, "*.pid"))) < 3:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "cancelled 3 job(s)" in err
    pids = [int(open(p).read()) for p in glob.glob(os.path.join(state, "*.pid"))]
    assert len(pids) == 3 and len(glob.glob(os.path.join(state, "*.cancelled"))) == 3
    time.sleep(1.0)
    for pid in pids:  # no job process is left running
        stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        assert stat in ("", "Z") or stat.startswith("Z"), (pid, stat)


@pytest.mark.slow
def test_two_cpu_workers_equal_one(reference, tiny_opt, tmp_path):
    env = env_for(str(tmp_path / "workers"), tiny_opt)
    proc = sh(run_args(env, "--workers", "2"), env, timeout=600)
    assert "2 shard(s) finished" in proc.stdout
    assert_same_runs(load_runs(env), reference)
    suite = os.path.join(env["out"], "runs", "s", "scaleout")
    results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(suite, "*.result.json")))]
    assert len(results) == 2 and len({r["pid"] for r in results}) == 2
    assert all(r["cuda_visible_devices"] == "" for r in results)  # each worker saw no GPU, set before start


@pytest.mark.slow
def test_mongo_cache_shared_by_two_shards_loses_nothing_and_restarts_computing_nothing(reference, tiny_opt,
                                                                                        tmp_path, monkeypatch):
    """HELM's MongoDB cache (`--mongo-uri`) against mongomock: one in-process store shared by every
    client HELM opens (it opens one per call). Two shards fill the same suite; after a restart of
    both, nothing is computed again."""
    import mongomock

    import helm.common.mongo_key_value_store as mkv
    from flexgen_helm.helm.batch_run import RunOptions, run
    from flexgen_helm.helm.shards import Shard

    server = mongomock.MongoClient("mongodb://fake-host/helm_cache")
    monkeypatch.setattr(mkv, "MongoClient", lambda uri, *a, **k: server)
    env = env_for(str(tmp_path / "mongo"), tiny_opt)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def shard_run(i: int):
        return run(RunOptions(conf=[env["conf"]], model="flexgen/tiny-opt", suite="s", output_path=env["out"],
                              local_path=env["prod_env"], engine={"gpu_batch_size": 1}, progress=False,
                              shard=Shard(i, 2), mongo_uri="mongodb://fake-host/helm_cache"))

    first = [shard_run(1), shard_run(2)]
    assert [s.requests for s in first] != [9, 0] and sum(s.requests for s in first) == 9  # really split
    assert all(s.computed_rows > 0 and not s.failures for s in first)
    engine_docs = [d for name in server["helm_cache"].list_collection_names()
                   for d in server["helm_cache"][name].find() if d["request"].get("engine") == "flexgen-helm"]
    assert len(engine_docs) == 9  # every request once: nothing lost, no duplicate
    assert not os.path.exists(os.path.join(env["prod_env"], "cache", "flexgen.sqlite"))  # no SQLite written
    again = [shard_run(1), shard_run(2)]
    assert [s.computed_rows for s in again] == [0, 0]
    assert_same_runs(load_runs(env), reference)
