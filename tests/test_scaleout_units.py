"""Scale-out pieces that need neither HELM runs nor processes: shard parsing and split, the recorded
plan, SQLite cache seeding/merging, the shard command line and Slurm options."""
from __future__ import annotations

import os
import sqlite3
import time

import pytest

from flexgen_helm.engine.config import ConfigError
from flexgen_helm.helm import shards
from flexgen_helm.helm.batch_run import RunOptions
from flexgen_helm.helm.launch import shard_argv
from flexgen_helm.helm.shards import Shard


def test_shard_parse():
    assert Shard.parse("2/4") == Shard(2, 4) and Shard.parse("2/4").label == "shard-2-of-4"
    for bad in ("0/3", "4/3", "3", "a/b", "1/0", ""):
        with pytest.raises(ConfigError, match="I/N"):
            Shard.parse(bad)


def test_assign_is_deterministic_balanced_and_complete():
    costs = {"a": 10.0, "b": 7.0, "c": 5.0, "d": 4.0, "e": 3.0, "f": 1.0}
    split = shards.assign(costs, 3)
    assert split == shards.assign(dict(reversed(list(costs.items()))), 3)  # input order does not matter
    assert sorted(n for s in split for n in s) == sorted(costs)  # every run spec exactly once
    loads = [sum(costs[n] for n in s) for s in split]
    assert max(loads) - min(loads) <= 2.0  # LPT: 10 | 7+3 | 5+4+1
    assert shards.assign({"x": 1.0}, 3) == [["x"], [], []]  # more shards than run specs: empty shards


def test_record_plan_first_writer_wins_and_mismatch_is_refused(tmp_path):
    p = shards.record_plan(str(tmp_path), 2, [["a"], ["b"]], {"a": 1.0, "b": 1.0})
    assert os.path.exists(p)
    shards.record_plan(str(tmp_path), 2, [["a"], ["b"]], {"a": 1.0, "b": 1.0})  # same split: fine
    with pytest.raises(ConfigError, match="different split"):
        shards.record_plan(str(tmp_path), 2, [["b"], ["a"]], {"a": 1.0, "b": 1.0})
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary files left


def _table(path: str, rows: dict[str, bytes]) -> None:
    with sqlite3.connect(path) as db:
        db.execute('CREATE TABLE IF NOT EXISTS "unnamed" (key TEXT PRIMARY KEY, value BLOB)')
        db.executemany('INSERT OR REPLACE INTO "unnamed" VALUES (?, ?)', rows.items())


def _rows(path: str) -> dict[str, bytes]:
    with sqlite3.connect(path) as db:
        return dict(db.execute('SELECT key, value FROM "unnamed"'))


def test_seed_and_merge_copy_rows_without_decoding(tmp_path):
    cache = tmp_path / "cache"
    os.makedirs(cache)
    # values are opaque bytes (not even a valid pickle): they are copied, never unpickled
    _table(str(cache / "flexgen.sqlite"), {"k1": b"\x00main1", "k2": b"\x00main2"})
    s1 = shards.shard_cache_dir(str(cache), "suite", Shard(1, 2))
    s2 = shards.shard_cache_dir(str(cache), "suite", Shard(2, 2))
    assert shards.seed_shard_cache(str(cache), s1, "flexgen.sqlite", ["k2", "k9"]) == 1
    assert _rows(os.path.join(s1, "flexgen.sqlite")) == {"k2": b"\x00main2"}
    _table(os.path.join(s1, "flexgen.sqlite"), {"k3": b"\x00s1"})
    os.makedirs(s2)
    _table(os.path.join(s2, "flexgen.sqlite"), {"k4": b"\x00s2", "k1": b"\x00other"})
    _table(os.path.join(s2, "huggingface.sqlite"), {"t": b"\x00tok"})
    merged = shards.merge_shard_caches(str(cache), "suite")
    assert merged == {"flexgen.sqlite": 2, "huggingface.sqlite": 1}
    assert _rows(str(cache / "flexgen.sqlite")) == {"k1": b"\x00main1", "k2": b"\x00main2", "k3": b"\x00s1",
                                                   "k4": b"\x00s2"}  # existing rows win
    assert shards.merge_shard_caches(str(cache), "suite") == {"flexgen.sqlite": 0, "huggingface.sqlite": 0}
    assert shards.merge_shard_caches(str(cache), "other-suite") == {}


def test_timing_log_is_per_shard():  # (disk-tier files need nothing: each engine makes its own temp dir)
    assert shards.timing_log_name("flexgen_timing.jsonl", None) == "flexgen_timing.jsonl"
    assert shards.timing_log_name("flexgen_timing.jsonl", Shard(1, 3)) == "flexgen_timing.shard-1-of-3.jsonl"


def test_shard_argv_round_trips_through_the_parser(tmp_path):
    from flexgen_helm.cli import build_parser
    from flexgen_helm.helm.cli import engine_overrides

    conf = tmp_path / "c.conf"
    conf.write_text("entries: []")
    opts = RunOptions(conf=[str(conf)], model="flexgen/opt-30b", suite="x", max_eval_instances=5,
                      run_entries=["mmlu:subject=anatomy"], output_path="out", local_path="pe",
                      engine={"gpu_mem": "16GB", "percent": (20.0, 80.0, 0.0, 100.0, 100.0, 0.0),
                              "compress_weight": True, "compress_cache": True, "device": "cuda",
                              "shared_host_weights": True},
                      mongo_uri="mongodb://h/db")
    argv = shard_argv(opts, Shard(2, 3))
    assert argv[1:3] == ["-m", "flexgen_helm.cli"]
    args = build_parser().parse_args(argv[3:])
    assert (args.shard, args.model, args.suite, args.max_eval_instances) == ("2/3", "flexgen/opt-30b", "x", 5)
    assert args.output_path == os.path.abspath("out") and args.conf == [str(conf)]
    assert args.mongo_uri == "mongodb://h/db" and args.run_entries == ["mmlu:subject=anatomy"]
    assert engine_overrides(args) == opts.engine


def test_local_workers_share_host_weights_when_an_offload_dir_is_given(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from flexgen_helm.helm import launch as launch_mod
    from flexgen_helm.helm import scaleout_cli

    seen = []
    monkeypatch.setattr(launch_mod, "launch", lambda opts, backend, lo: seen.append(dict(opts.engine)) or
                        SimpleNamespace(failed=[]))
    monkeypatch.setattr(launch_mod, "print_launch_summary", lambda *a: None)
    args = SimpleNamespace(slurm=False, gpus=None, workers=2, slurm_arg=[], shards=None, max_jobs=None, retries=1,
                           poll=1.0)
    for engine in ({"offload_dir": str(tmp_path)}, {}):
        opts = RunOptions(conf=[], model="m", suite="s", engine=dict(engine))
        assert scaleout_cli.launch(args, opts) == 0
    assert seen == [{"offload_dir": str(tmp_path), "shared_host_weights": True}, {}]


def test_slurm_options(tmp_path):
    from flexgen_helm.helm.slurm import check_sbatch_options, job_args, parse_slurm_args

    (tmp_path / "runner_config.yaml").write_text("slurm_args:\n  partition: big\n  mem: 32G\n  time: '4:00:00'\n")
    cli = parse_slurm_args(["mem=64G", "--cpus-per-task=8"])
    assert cli == {"mem": "64G", "cpus_per_task": "8"}
    args = job_args(str(tmp_path), cli, uses_gpu=True)
    assert args == {"partition": "big", "mem": "64G", "time": "4:00:00", "cpus_per_task": "8", "gres": "gpu:1"}
    assert "gres" not in job_args(str(tmp_path), cli, uses_gpu=False)  # CPU deployments ask for no GPU
    assert job_args(str(tmp_path), {"gpus": "2"}, uses_gpu=True).get("gres") is None  # the user's GPU ask wins
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_slurm_args(["mem"])
    with pytest.raises(ConfigError, match="unknown sbatch option"):
        check_sbatch_options({"memory_please": "1"})


def test_local_workers_each_see_only_their_gpu(tmp_path):
    """--gpus 0,1: every worker process starts with its own CUDA_VISIBLE_DEVICES (no pool initializer)."""
    import sys
    import time

    from flexgen_helm.helm.workers import LocalBackend, parse_gpus

    backend = LocalBackend(parse_gpus("0,1"), cpu=False)
    show = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"]
    handles = [backend.submit(Shard(i, 2), show, str(tmp_path / f"{i}.log")) for i in (1, 2)]
    with pytest.raises(RuntimeError, match="no free device slot"):
        backend.submit(Shard(1, 2), show, str(tmp_path / "x.log"))
    deadline = time.time() + 60
    while time.time() < deadline and any(backend.state(h) == "running" for h in handles):
        time.sleep(0.05)
    assert [backend.state(h) for h in handles] == ["done", "done"]
    assert sorted((tmp_path / f"{i}.log").read_text().strip() for i in (1, 2)) == ["0", "1"]
    assert backend.busy == set()  # slots are free again
    with pytest.raises(ConfigError, match="distinct"):
        parse_gpus("0,0")


def test_cache_key_separates_deployments_and_compute_dtypes():
    """Shards and workers share one cache: entries must never mix outputs of different numerics."""
    from helm.common.request import Request

    from flexgen_helm.engine.config import default_dtype
    from flexgen_helm.helm.client import FlexGenClient

    def key(deployment: str, **client_args) -> dict:
        r = Request(model="m/x", model_deployment=deployment, prompt="Q", temperature=0.0, max_tokens=3)
        return FlexGenClient(None, model_path="m", **client_args).cache_key(r)

    assert key("flexgen/x", device="cpu")["dtype"] == default_dtype("cpu")  # "auto" resolved as the engine does
    assert key("flexgen/x", device="cpu", dtype="float32")["dtype"] == "float32"
    assert key("flexgen/x", device="cpu") != key("flexgen/x-4bit", device="cpu")
    assert key("flexgen/x", device="cpu") == key("flexgen/x", device="cpu", gpu_batch_size=7)  # placement: same


@pytest.mark.parametrize("during", ["state", "submit", "sleep"])
def test_ctrl_c_inside_a_backend_call_that_swallows_it_still_cancels_every_job(tmp_path, monkeypatch, during):
    """HELM's Slurm helpers retry on any exception, KeyboardInterrupt included (`retrying`), so a
    Ctrl-C landing inside scontrol/sbatch was lost and the launcher kept polling. The launcher holds
    the signal while a backend call runs and raises it after: every live job is cancelled."""
    import signal

    from flexgen_helm.helm.launch import LaunchOptions, launch

    class SwallowingBackend:
        name = "fake"

        def __init__(self):
            self.submitted, self.cancelled, self.polls = [], [], 0

        def _ctrl_c_swallowed(self):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs between bytecodes: give it some
                    pass
            except KeyboardInterrupt:
                pass  # what `retrying` does, then it calls again and returns the answer

        def submit(self, shard, argv, log):
            self.submitted.append(shard.index)
            if during == "submit" and len(self.submitted) == 2:
                self._ctrl_c_swallowed()
            return shard.index

        def state(self, handle):
            self.polls += 1
            if during == "state" and self.polls == 3:
                self._ctrl_c_swallowed()
            return "done" if self.polls > 50 else "running"  # a lost Ctrl-C ends here, not in a hang

        def cancel(self, handle):
            self.cancelled.append(handle)

    backend = SwallowingBackend()
    opts = RunOptions(conf=[], model="m", suite="s", output_path=str(tmp_path))
    lo = LaunchOptions(shards=3, max_jobs=3, poll_s=0.01, summarize=False)
    if during == "sleep":  # a Ctrl-C outside backend calls is raised at once, as before
        real_sleep, calls = time.sleep, []
        monkeypatch.setattr(time, "sleep", lambda s: (calls.append(s), os.kill(os.getpid(), signal.SIGINT)
                                                      if len(calls) == 2 else real_sleep(s))[-1])
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or in a background job
    with pytest.raises(KeyboardInterrupt):
        launch(opts, backend, lo)
    assert sorted(backend.cancelled) == sorted(backend.submitted) and backend.submitted
    assert backend.polls <= 12
    assert signal.getsignal(signal.SIGINT) == before  # the caller's handler is put back
