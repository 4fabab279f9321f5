"""Faults from outside the process (slow: each starts a fresh `flexgen-helm run`):
SIGTERM/SIGINT sent by another process mid-run, and a real full disk (a small tmpfs mounted in a
private mount namespace, where `unshare` allows it)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow

ENGINE = ["--gpu-batch-size", "1", "--percent", "50", "0", "0", "0", "100", "0"]


@pytest.fixture
def env(tiny_opt, tmp_path):
    from flexgen_helm.helm.prod_env import add_checkpoint

    add_checkpoint(str(tmp_path / "prod_env"), tiny_opt, name="tiny-opt", client_args={"dtype": "float32"})
    (tmp_path / "offload").mkdir()
    return tmp_path


def start(env, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "flexgen_helm.cli", "run", "--model", "flexgen/tiny-opt",
            "-r", "synthetic_reasoning:mode=pattern_match", "-m", "12", "--suite", "s", "--local-path", "prod_env",
            "-o", "out", "--no-progress", "--offload-dir", "offload", *ENGINE, *extra]
    penv = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                          + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    return subprocess.Popen(args, cwd=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=penv)


def engine_rows(env) -> int:
    with sqlite3.connect(env / "prod_env" / "cache" / "flexgen.sqlite") as con:
        return con.execute("""SELECT COUNT(*) FROM unnamed WHERE key LIKE '%"engine": "flexgen-helm"%'""").fetchone()[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_from_outside(env, sig):
    log = env / "out" / "runs" / "s" / "flexgen_timing.jsonl"
    proc = start(env)
    deadline = time.time() + 600
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    t0 = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    took = time.time() - t0
    print(f"{signal.Signals(sig).name}: exit {proc.returncode} after {took:.2f} s")
    assert proc.returncode == 128 + sig and took < 15, err[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in err
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert 2 <= len(lines) < 12 and engine_rows(env) == sum(line["rows"] for line in lines)
    assert os.listdir(env / "offload") == []
    # the rerun finishes the rest
    proc = start(env)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-2000:]
    assert f"{12 - len(lines)} rows computed" in out and engine_rows(env) == 12


def _unshare_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                        "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _unshare_ok(), reason="cannot mount a tmpfs in a private namespace here")
def test_real_full_disk(tiny_opt, tmp_path):
    """A 256 KB tmpfs as offload directory: the weights (about 1 MB on disk) do not fit, and the
    engine says so before writing them; nothing is left on the tmpfs."""
    off = tmp_path / "small"
    off.mkdir()
    code = textwrap.dedent(f"""
        import os, torch
        from flexgen_helm.engine.engine import Engine
        from flexgen_helm.engine.config import Policy
        from flexgen_helm.engine.tiers import OffloadDiskError
        try:
            Engine.from_pretrained({tiny_opt!r}, policy=Policy(gpu_batch_size=2, w_gpu_percent=0, w_cpu_percent=0),
                                   dtype=torch.float32, offload_dir={str(off)!r})
            print("NO ERROR")
        except OffloadDiskError as e:
            print("ERROR", e)
        print("LEFT", os.listdir({str(off)!r}))
    """)
    py = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k tmpfs {off} && {py}"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert "ERROR the offload directory" in r.stdout and "MB free but weights needs" in r.stdout, r.stdout + r.stderr
    assert "LEFT []" in r.stdout
