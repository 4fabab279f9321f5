"""End to end, offline, on a tiny local OPT with its own tokenizer: stock `helm-run` with the flexgen
client, `helm-run --runner-class-name`, and `flexgen-helm run` must give the same HELM runs;
`helm-summarize` works on the suite; a killed `flexgen-helm run` resumes without recomputing."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

BIN = os.path.dirname(sys.executable)
CONF = """entries: [
  {description: "synthetic_reasoning:mode=pattern_match,model=flexgen/tiny-opt,max_eval_instances=4", priority: 1}
  {description: "mmlu:subject=abstract_algebra,model=flexgen/tiny-opt,max_eval_instances=4", priority: 1}
]
"""
RUN_FILES = ("run_spec.json", "scenario.json", "scenario_state.json", "stats.json", "per_instance_stats.json")
# runtime-dependent stats; everything else must be equal across paths
TIMING_STATS = {"inference_runtime", "inference_denoised_runtime", "batch_size", "inference_idealized_runtime"}
# derived from logprobs: equal up to fp32 rounding, which differs with batch shape and padding
LOGPROB_STATS = {"logprob", "max_prob", "perplexity", "bits_per_byte", "logprob_per_byte", "ece_1_bin",
                 "ece_10_bin", "selective_cov_acc_area", "selective_acc@10", "platt_ece_1_bin",
                 "platt_ece_10_bin", "platt_coef", "platt_intercept"}


def make_env(root: str, tiny_opt: str, standins: bool = True) -> dict:
    from flexgen_helm.helm.prod_env import add_checkpoint
    from flexgen_helm.helm.standins import place_standins

    os.makedirs(root, exist_ok=True)
    env = {"root": root, "prod_env": os.path.join(root, "prod_env"), "out": os.path.join(root, "out"),
           "conf": os.path.join(root, "conf")}
    add_checkpoint(env["prod_env"], tiny_opt, name="tiny-opt", client_args={"dtype": "float32"})
    if standins:
        place_standins(env["out"])
    with open(env["conf"], "w") as f:
        f.write(CONF)
    return env


def sh(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    penv = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(args, cwd=env["root"], capture_output=True, text=True, timeout=timeout, env=penv)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def helm_run(env: dict, *extra: str) -> None:
    sh([os.path.join(BIN, "helm-run"), "-c", env["conf"], "--suite", "s", "-m", "4", "-n", "2",
        "--local-path", env["prod_env"], "-o", env["out"], *extra], env)


def flexgen_run(env: dict, *extra: str) -> list[str]:
    return [os.path.join(BIN, "flexgen-helm"), "run", "--conf", env["conf"], "--model", "flexgen/tiny-opt",
            "--suite", "s", "-m", "4", "--local-path", env["prod_env"], "-o", env["out"], "--no-progress", *extra]


def load_runs(env: dict) -> dict:
    runs = {}
    for d in sorted(glob.glob(os.path.join(env["out"], "runs", "s", "*:*"))):
        assert all(os.path.exists(os.path.join(d, f)) for f in RUN_FILES), d
        with open(os.path.join(d, "scenario_state.json")) as f:
            states = json.load(f)["request_states"]
        with open(os.path.join(d, "stats.json")) as f:
            stats = {json.dumps(s["name"], sort_keys=True): s.get("mean") for s in json.load(f)}
        runs[os.path.basename(d)] = {
            "texts": [[c["text"] for c in s["result"]["completions"]] for s in states],
            "logprobs": [[t["logprob"] for c in s["result"]["completions"] for t in c["tokens"]] for s in states],
            "stats": stats}
    return runs


@pytest.fixture(scope="module")
def three_paths(tiny_opt, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("paths"))
    envs = {k: make_env(os.path.join(root, k), tiny_opt) for k in ("stock", "runner", "flexgen")}
    helm_run(envs["stock"])
    helm_run(envs["runner"], "--runner-class-name", "flexgen_helm.helm.runner.FlexGenRunner")
    sh(flexgen_run(envs["flexgen"]), envs["flexgen"])
    return envs, {k: load_runs(e) for k, e in envs.items()}


def test_three_paths_give_identical_runs(three_paths):
    _, runs = three_paths
    stock = runs["stock"]
    assert len(stock) == 2 and {n.split(":")[0] for n in stock} == {"synthetic_reasoning", "mmlu"}
    for path in ("runner", "flexgen"):
        assert sorted(runs[path]) == sorted(stock), path  # same run names
        for name, ref in stock.items():
            got = runs[path][name]
            assert got["texts"] == ref["texts"], (path, name)  # greedy outputs: identical
            for a, b in zip(got["logprobs"], ref["logprobs"]):
                assert a == pytest.approx(b, abs=1e-4)
            assert got["stats"].keys() == ref["stats"].keys()
            for key, value in ref["stats"].items():
                metric = json.loads(key)["name"]
                if metric in TIMING_STATS:
                    continue
                if metric in LOGPROB_STATS:
                    assert got["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (path, name, key)
                else:  # accuracy, counts, lengths, finish reasons: exactly equal
                    assert got["stats"][key] == value, (path, name, key)
    # logprobs are real, not FlexGen's all-zero placeholders
    lps = [lp for run in stock.values() for row in run["logprobs"] for lp in row]
    assert lps and any(lp < -1e-3 for lp in lps) and all(lp <= 0 for lp in lps)


def test_batched_paths_really_batch(three_paths):
    envs, runs = three_paths
    name = next(n for n in runs["flexgen"] if n.startswith("synthetic"))
    assert runs["flexgen"][name]["stats"][json.dumps({"name": "batch_size", "split": "test"}, sort_keys=True)] == 4
    assert runs["stock"][name]["stats"][json.dumps({"name": "batch_size", "split": "test"}, sort_keys=True)] == 1
    for path in ("runner", "flexgen"):
        with open(os.path.join(envs[path]["out"], "runs", "s", "flexgen_timing.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        assert sum(line["rows"] for line in lines) == 8
        assert all(0 < line["prompt_tokens"] <= line["padded_prompt_tokens"] for line in lines)
        assert {n for line in lines for n in line["run_specs"]} == set(runs[path])


def test_helm_summarize_on_the_suite(three_paths):
    envs, _ = three_paths
    env = envs["flexgen"]
    # one thread: CPython 3.11 can fail to build ASTs in several threads at once (see demo.summarize)
    sh([os.path.join(BIN, "helm-summarize"), "--suite", "s", "-o", env["out"], "--local-path", env["prod_env"],
        "--num-threads", "1"], env)
    suite = os.path.join(env["out"], "runs", "s")
    for f in ("summary.json", "runs.json", "groups.json"):
        assert os.path.exists(os.path.join(suite, f))
    with open(os.path.join(suite, "groups", "mmlu.json")) as f:
        assert "tiny-opt" in f.read()


def _cached_keys(env: dict) -> int:
    path = os.path.join(env["prod_env"], "cache", "flexgen.sqlite")
    if not os.path.exists(path):
        return 0
    with sqlite3.connect(path) as db:  # the tokenizer's cache shares this file: count engine results only
        return sum('"engine": "flexgen-helm"' in k for (k,) in db.execute("SELECT key FROM unnamed"))


def test_killed_run_resumes_without_recomputation(three_paths, tiny_opt, tmp_path):
    _, runs = three_paths
    env = make_env(str(tmp_path / "resume"), tiny_opt)
    log = os.path.join(env["out"], "runs", "s", "flexgen_timing.jsonl")
    args = flexgen_run(env, "--gpu-batch-size", "1")  # one row per batch: 8 batches
    proc = subprocess.Popen(args, cwd=env["root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and os.path.getsize(log) > 0:
            proc.send_signal(signal.SIGKILL)  # no chance to clean up: like a crash or a lost machine
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = _cached_keys(env)
    with open(log) as f:
        logged_before = sum(json.loads(line)["rows"] for line in f)
    assert 1 <= logged_before <= done_before < 8

    out = sh(args, env).stdout
    assert f"{8 - done_before} rows computed" in out  # exactly the unfinished requests
    with open(log) as f:
        rows = [json.loads(line)["rows"] for line in f]
    assert sum(rows) <= 8 and _cached_keys(env) == 8
    resumed = load_runs(env)
    assert sorted(resumed) == sorted(runs["flexgen"])
    for name, ref in runs["flexgen"].items():  # equal to the uninterrupted run
        assert resumed[name]["texts"] == ref["texts"]


def test_stock_helm_run_reuses_flexgen_cache(three_paths, tmp_path):
    """`flexgen-helm run` fills HELM's own request cache: a later stock helm-run computes nothing."""
    envs, runs = three_paths
    env = dict(envs["flexgen"])
    env["out"] = str(tmp_path / "out2")
    shutil.copytree(os.path.join(envs["flexgen"]["out"], "scenarios"), os.path.join(env["out"], "scenarios"))
    before = _cached_keys(env)
    helm_run(env)
    assert _cached_keys(env) == before
    assert {n: r["texts"] for n, r in load_runs(env).items()} == {n: r["texts"] for n, r in runs["flexgen"].items()}
