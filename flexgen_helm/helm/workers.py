"""`flexgen-helm run --gpus 0,1,2,3` / `--workers N`: one worker process per device on this host.

Each worker is a shard: a fresh `flexgen-helm run --shard I/N` process (spawned, never forked from a
pool), started with its own `CUDA_VISIBLE_DEVICES` already in its environment, so it cannot see
another worker's GPU. `--workers N` does the same on the CPU (no GPU visible), with the host's cores
split between the workers.
"""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from ..engine.config import ConfigError
from .shards import Shard


def parse_gpus(text: str) -> list[str]:
    ids = [x.strip() for x in text.split(",") if x.strip()]
    if not ids or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus takes distinct device ids, e.g. 0,1,2,3; got {text!r}")
    return ids


@dataclass
class _Worker:
    proc: subprocess.Popen
    slot: int  # index into LocalBackend.devices
    log: Any


class LocalBackend:
    """Runs shards as child processes; at most one per device slot at a time."""

    def __init__(self, devices: list[str], cpu: bool):
        self.name = "workers"
        self.devices = devices  # CUDA ids, or "" per CPU worker
        self.cpu = cpu
        self.busy: set[int] = set()
        self.threads = max(1, (os.cpu_count() or 1) // max(1, len(devices)))

    def _env(self, device: str) -> dict[str, str]:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = device  # "" on CPU workers: no GPU at all
        if self.cpu and "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    def submit(self, shard: Shard, argv: list[str], log_path: str) -> _Worker:
        slot = next((i for i in range(len(self.devices)) if i not in self.busy), None)
        if slot is None:  # the launcher runs at most len(devices) at once
            raise RuntimeError("no free device slot")
        self.busy.add(slot)
        log = open(log_path, "w")
        proc = subprocess.Popen(argv, env=self._env(self.devices[slot]), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        return _Worker(proc, slot, log)

    def _release(self, w: _Worker) -> None:
        self.busy.discard(w.slot)
        if not w.log.closed:
            w.log.close()

    def state(self, w: _Worker) -> str:
        rc = w.proc.poll()
        if rc is None:
            return "running"
        self._release(w)
        return "done" if rc == 0 else "failed"

    def cancel(self, w: _Worker) -> None:
        if w.proc.poll() is None:
            try:
                os.killpg(w.proc.pid, signal.SIGTERM)
                w.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait()
            except ProcessLookupError:
                pass
        self._release(w)
