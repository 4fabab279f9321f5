"""Faults during a long `flexgen-helm run`: signals, a second run on the suite, a full or vanished
offload directory, damaged checkpoints and a damaged request cache. Each case asserts the exact
outcome: the message, the exit code, what is in the cache afterwards, and that the resumed run
equals an uninterrupted one.

Runs are in-process (`flexgen_helm.cli.main`); signals are real (`os.kill` on this process) and are
sent from the observer hooks, so where they land (while a batch commits, while one computes) is
deterministic. `test_faults_slow.py` repeats the signal case from outside, on a child process.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sqlite3
import time

import pytest

from flexgen_helm.cli import main
from flexgen_helm.helm import client as client_mod
from flexgen_helm.helm.timing import TIMING_LOG, TimingObserver

ENTRY = "mmlu:subject=abstract_algebra"
N = 10  # requests; 5 engine batches of 2 (max_tokens 1: fast)
# weights half on disk, KV cache on disk: every batch writes offload files
ENGINE = ["--gpu-batch-size", "2", "--percent", "50", "0", "0", "0", "100", "0"]


@pytest.fixture(scope="module")
def base(tiny_opt, tmp_path_factory):
    from flexgen_helm.helm.prod_env import add_checkpoint
    from flexgen_helm.helm.standins import place_standins

    root = tmp_path_factory.mktemp("faults")
    prod_env = str(root / "prod_env")
    add_checkpoint(prod_env, tiny_opt, name="tiny-opt", client_args={"dtype": "float32"})
    return {"root": root, "prod_env": prod_env, "place_standins": place_standins}


@pytest.fixture
def env(base, tmp_path):
    """A fresh output folder, request cache and offload directory for one test."""
    local = str(tmp_path / "prod_env")
    shutil.copytree(base["prod_env"], local)
    out = str(tmp_path / "out")
    base["place_standins"](out)
    off = tmp_path / "offload"
    off.mkdir()
    client_mod.close_engine()  # each test loads its own engine (offload dir differs)
    yield {"prod_env": local, "out": out, "offload": str(off), "cache": os.path.join(local, "cache", "flexgen.sqlite")}
    client_mod.close_engine()


def run(env, *extra: str, suite: str = "s") -> int:
    return main(["run", "--model", "flexgen/tiny-opt", "-r", ENTRY, "-m", str(N), "--suite", suite,
                 "--local-path", env["prod_env"], "-o", env["out"], "--no-progress", "--offload-dir", env["offload"],
                 *ENGINE, *extra])


def cache_rows(env) -> int:
    if not os.path.exists(env["cache"]):
        return 0
    with sqlite3.connect(env["cache"]) as con:
        # the file also holds HELM's tokenizer cache (same host organization): count our entries
        return con.execute("""SELECT COUNT(*) FROM unnamed WHERE key LIKE '%"engine": "flexgen-helm"%'""").fetchone()[0]


def timing_lines(env, suite: str = "s") -> list[dict]:
    path = os.path.join(env["out"], "runs", suite, TIMING_LOG)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]  # every line must parse


def offload_leftovers(env) -> list[str]:
    return os.listdir(env["offload"])


def completions(env, suite: str) -> list[tuple]:
    """(prompt, completion text, token texts) of every request of the run, in HELM's order."""
    runs = os.path.join(env["out"], "runs", suite)
    (name,) = [d for d in os.listdir(runs) if d.startswith("mmlu")]
    with open(os.path.join(runs, name, "scenario_state.json")) as f:
        states = json.load(f)["request_states"]
    return [(s["request"]["prompt"], s["result"]["completions"][0]["text"],
             tuple(t["text"] for t in s["result"]["completions"][0]["tokens"])) for s in states]


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    """The same run, never interrupted: what every resumed run must equal."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    local = str(tmp / "prod_env")
    shutil.copytree(base["prod_env"], local)
    env = {"prod_env": local, "out": str(tmp / "out"), "offload": str(tmp / "offload")}
    base["place_standins"](env["out"])
    os.mkdir(env["offload"])
    client_mod.close_engine()
    assert run(env, suite="ref") == 0
    client_mod.close_engine()
    return completions(env, "ref")


def signal_after(monkeypatch, hook: str, when: int, sig: int) -> dict:
    """Send `sig` to this process from TimingObserver.<hook> on its `when`-th call."""
    sent: dict = {"calls": 0}
    original = getattr(TimingObserver, hook)

    def hooked(self, *a, **kw):
        out = original(self, *a, **kw)
        sent["calls"] += 1
        if sent["calls"] == when:
            sent["t"] = time.time()
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(TimingObserver, hook, hooked)
    return sent


# ---- SIGTERM / SIGINT ---------------------------------------------------------------------------------

def test_signals_keep_batches_whole_clean_up_and_resume(env, uninterrupted, monkeypatch, capsys):
    # 1. SIGTERM while batch 2 is being committed: it is held until the commit is done
    sent = signal_after(monkeypatch, "batch_done", 2, signal.SIGTERM)
    assert run(env) == 128 + signal.SIGTERM
    assert time.time() - sent["t"] < 10
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert len(timing_lines(env)) == 2 and cache_rows(env) == 4  # two whole batches
    assert offload_leftovers(env) == [] and client_mod._ENGINE is None
    monkeypatch.undo()

    # 2. Ctrl-C while batch 3 computes (after its rows are done, before its commit): dropped whole
    sent = signal_after(monkeypatch, "rows_done", 1, signal.SIGINT)
    assert run(env) == 128 + signal.SIGINT
    assert time.time() - sent["t"] < 10
    assert "stopped by SIGINT" in capsys.readouterr().err
    assert len(timing_lines(env)) == 2 and cache_rows(env) == 4
    assert offload_leftovers(env) == []
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers are restored

    # 3. the rerun computes only what is missing, and equals a run never interrupted
    assert run(env) == 0
    assert f"{N - 4} rows computed in 3 engine batches" in capsys.readouterr().out
    assert len(timing_lines(env)) == 5 and cache_rows(env) == N
    assert completions(env, "s") == uninterrupted


def test_timing_log_partial_last_line_is_dropped(env, capsys):
    """A SIGKILL in the middle of a write leaves half a line: the next run cuts it off."""
    path = os.path.join(env["out"], "runs", "s", TIMING_LOG)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('{"batch_id": "x", "rows": 1}\n{"batch_id": "half-wri')
    assert run(env) == 0
    lines = timing_lines(env)
    assert lines[0] == {"batch_id": "x", "rows": 1} and len(lines) == 6


# ---- two runs on one suite ------------------------------------------------------------------------------

def test_second_run_on_the_suite_refuses(env, capsys):
    from flexgen_helm.helm.run_lock import RunLock

    with RunLock(env["out"], "s"):
        assert run(env) == 2
        err = capsys.readouterr().err
        assert "another flexgen-helm run is writing" in err
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in err
        assert "database is locked" not in err
        # nothing was planned or written: no run folder, no cache
        assert sorted(os.listdir(os.path.join(env["out"], "runs", "s"))) == [".flexgen-run.lock"]
        assert cache_rows(env) == 0
    assert run(env) == 0  # released: the run goes ahead


def test_shards_of_one_suite_may_run_together(tmp_path):
    from flexgen_helm.engine.config import ConfigError
    from flexgen_helm.helm.run_lock import RunLock, RunLockedError

    out = str(tmp_path)
    with RunLock(out, "s", "1/2"), RunLock(out, "s", "2/2"), RunLock(out, "other"):
        with pytest.raises(RunLockedError, match=r"suite 's' shard 1/2 is already running \(pid \d+"):
            RunLock(out, "s", "1/2").acquire()
        with pytest.raises(RunLockedError, match=r"shard 1/2 \(pid .*shard 2/2 \(pid "):
            RunLock(out, "s").acquire()  # an unsharded run beside shards
    with RunLock(out, "s"):
        with pytest.raises(RunLockedError, match="another flexgen-helm run"):
            RunLock(out, "s", (2, 2)).acquire()  # a shard beside an unsharded run
    with pytest.raises(ConfigError, match="I/N"):
        RunLock(out, "s", "two of four")
    with pytest.raises(ConfigError, match="1 <= I <= N"):
        RunLock(out, "s", "5/4")


# ---- the offload directory -------------------------------------------------------------------------------

def fail_writes(monkeypatch, name_prefix: str, err: int, after_files: int = 0) -> None:
    """os.pwrite fails with `err` on offload files named name_prefix* (from the `after_files`+1-th
    such file on): what a full or read-only disk does to the engine's writes."""
    real = os.pwrite
    seen: set[str] = set()

    def pwrite(fd, data, offset):
        path = os.readlink(f"/proc/self/fd/{fd}")
        name = os.path.basename(path)
        if name.startswith(name_prefix):
            seen.add(name)
            if len(seen) > after_files:
                raise OSError(err, os.strerror(err))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


def test_disk_full_while_writing_weights(env, tiny_opt, monkeypatch):
    import torch

    from flexgen_helm.engine.config import Policy
    from flexgen_helm.engine.engine import Engine
    from flexgen_helm.engine.tiers import OffloadDiskError

    fail_writes(monkeypatch, "weights", errno.ENOSPC)
    with pytest.raises(OffloadDiskError, match=r"is full .* while writing weights.bin: this engine needs [\d.]+ MB"):
        Engine.from_pretrained(tiny_opt, policy=Policy(gpu_batch_size=2, w_gpu_percent=20, w_cpu_percent=30),
                               dtype=torch.float32, offload_dir=env["offload"])
    assert offload_leftovers(env) == []  # nothing left behind


def test_not_enough_space_is_said_before_writing(env, tiny_opt, monkeypatch):
    import torch

    from flexgen_helm.engine import tiers
    from flexgen_helm.engine.config import Policy
    from flexgen_helm.engine.engine import Engine
    from flexgen_helm.engine.tiers import OffloadDiskError

    monkeypatch.setattr(tiers.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 5000, 5000))
    with pytest.raises(OffloadDiskError, match=r"has 0.0 MB free but weights needs [\d.]+ MB"):
        Engine.from_pretrained(tiny_opt, policy=Policy(gpu_batch_size=2, w_gpu_percent=20, w_cpu_percent=30),
                               dtype=torch.float32, offload_dir=env["offload"])
    assert offload_leftovers(env) == []


def test_disk_full_while_writing_kv_cache_mid_run(env, uninterrupted, monkeypatch, capsys):
    # each batch writes 2 layers x 1 micro-batch KV files: fail from the 3rd batch's files on
    fail_writes(monkeypatch, "kv-", errno.ENOSPC, after_files=4)
    assert run(env) == 2
    err = capsys.readouterr().err
    assert "flexgen-helm run: error: the offload directory" in err and "is full" in err and "Traceback" not in err
    assert len(timing_lines(env)) == 2 and cache_rows(env) == 4  # the batches before it stay
    assert offload_leftovers(env) == []
    monkeypatch.undo()
    client_mod.close_engine()
    assert run(env) == 0  # space is back: resume
    assert f"{N - 4} rows computed" in capsys.readouterr().out
    assert completions(env, "s") == uninterrupted


def test_offload_directory_removed_mid_run(env, monkeypatch, capsys):
    original = TimingObserver.batch_done

    def remove_after_first(self, report):
        original(self, report)
        if self.batches == 1:
            shutil.rmtree(env["offload"])

    monkeypatch.setattr(TimingObserver, "batch_done", remove_after_first)
    assert run(env) == 2
    err = capsys.readouterr().err
    assert f"the offload directory {env['offload']}" in err and "was removed" in err
    assert cache_rows(env) == 2
    monkeypatch.undo()
    os.mkdir(env["offload"])
    client_mod.close_engine()
    assert run(env) == 0


@pytest.mark.parametrize("err,words", [(errno.EROFS, "is not writable (Read-only file system)"),
                                       (errno.EACCES, "is not writable (Permission denied)")])
def test_offload_directory_read_only(env, monkeypatch, capsys, err, words):
    from flexgen_helm.engine import tiers

    real_open = open

    def ro_open(path, mode="r", *a, **kw):
        if "w" in mode and os.path.basename(str(path)).startswith("kv-"):
            raise OSError(err, os.strerror(err), path)
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(tiers, "open", ro_open, raising=False)
    assert run(env) == 2
    msg = capsys.readouterr().err
    assert words in msg and env["offload"] in msg
    assert offload_leftovers(env) == [] and cache_rows(env) == 0


# ---- damaged checkpoints and caches ---------------------------------------------------------------------

@pytest.fixture
def ckpt_copy(tiny_opt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_opt, d)
    return d


def load(path) -> None:
    import torch

    from flexgen_helm.engine.config import Policy
    from flexgen_helm.engine.engine import Engine
    with Engine.from_pretrained(str(path), policy=Policy(gpu_batch_size=2), dtype=torch.float32):
        pass


def test_truncated_weight_file(ckpt_copy):
    from flexgen_helm.engine.config import ConfigError

    f = ckpt_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"cannot read weight file .*model.safetensors.*corrupt or incomplete"):
        load(ckpt_copy)


def test_safetensors_header_that_lies(ckpt_copy):
    from flexgen_helm.engine.config import ConfigError

    f = ckpt_copy / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__" and header[k]["shape"] and len(header[k]["shape"]) == 2)
    header[name]["shape"] = [header[name]["shape"][0] * 2, header[name]["shape"][1]]  # more than its bytes
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(ConfigError, match=r"model.safetensors"):
        load(ckpt_copy)


def test_shard_missing_from_index(tiny_opt_sharded, tmp_path):
    from flexgen_helm.engine.config import ConfigError

    d = tmp_path / "sharded"
    shutil.copytree(tiny_opt_sharded, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    with pytest.raises(ConfigError, match=f"shard files listed in model.safetensors.index.json are missing.*{shard}"):
        load(d)
    # the index forgets a shard that is still there: its tensors are missing, said by name
    shutil.copytree(tiny_opt_sharded, tmp_path / "sharded2")
    d2 = tmp_path / "sharded2"
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    (d2 / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"lacks tensor decoder\."):
        load(d2)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_request_cache_is_named_and_kept(env, capsys, damage):
    assert run(env) == 0
    client_mod.close_engine()
    from flexgen_helm.helm import cache_check
    cache_check._CHECKED.clear()
    path = env["cache"]
    raw = open(path, "rb").read()
    if damage == "garbage":
        bad = b"this is not an sqlite file" * 100
    else:  # a copy cut short (disk full while copying, or a half-synced file system)
        with sqlite3.connect(path) as con:  # make it span several pages first
            con.execute("CREATE TABLE pad (x)")
            con.executemany("INSERT INTO pad VALUES (?)", [("y" * 1000,)] * 200)
        raw = open(path, "rb").read()
        bad = raw[: len(raw) // 2]
    with open(path, "wb") as f:
        f.write(bad)
    assert run(env, suite="s2") == 2
    err = capsys.readouterr().err
    assert f"the request cache {path} is damaged" in err and "left untouched" in err
    assert open(path, "rb").read() == bad  # never recreated


def test_engine_close_touches_only_its_own_descriptors(tiny_opt, tmp_path):
    """KV block files are removed as blocks finish; closing the engine must not close them again
    (the numbers may belong to another file by then, e.g. the run lock) nor release their bytes twice."""
    import torch

    from flexgen_helm.engine.config import Policy
    from flexgen_helm.engine.engine import Engine

    eng = Engine.from_pretrained(tiny_opt, policy=Policy(gpu_batch_size=2, w_gpu_percent=50, w_cpu_percent=0,
                                                         cache_gpu_percent=0, cache_cpu_percent=0),
                                 dtype=torch.float32, offload_dir=str(tmp_path))
    weights_on_disk = eng.tiers.stats["disk"].used
    for _ in range(3):
        eng.generate([[2, 5, 6], [2, 7]], max_new_tokens=3)
    assert eng.tiers.stats["disk"].used == weights_on_disk and len(eng.tiers._files) == 1
    fds = [os.open(str(tmp_path / f"other-{i}"), os.O_CREAT | os.O_RDWR) for i in range(16)]
    eng.close()
    for fd in fds:
        os.fstat(fd)  # still open
        os.close(fd)
    assert eng.tiers.stats["disk"].used == 0
