"""One `flexgen-helm run` per suite at a time (shards of one suite excepted).

Two runs writing the same suite would compute the same requests twice, fight over HELM's SQLite
cache and interleave files in one run folder. The lock is an `flock` on files under
`<output>/runs/<suite>/`, so it disappears with its process, even after SIGKILL: no stale lock to
clean up by hand. The files keep the owner's pid and host only for the error message.

- an unsharded run holds the suite file exclusively;
- a shard ("I/N") holds the suite file shared and its own shard file exclusively, so shards of one
  suite run side by side, but never beside an unsharded run or a second copy of the same shard.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any

from ..engine.config import ConfigError

SUITE_LOCK = ".flexgen-run.lock"


class RunLockedError(ConfigError):
    """Another run holds the suite (or this shard of it)."""


def shard_label(shard: Any) -> str | None:
    """None, a Shard, "I/N" or (I, N) -> "I-of-N" (a file-name-safe label), validated by Shard."""
    from .shards import Shard
    if shard is None:
        return None
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    elif not isinstance(shard, Shard):
        shard = Shard.parse("/".join(str(x) for x in shard))
    return f"{shard.index}-of-{shard.count}"


def _owner(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "an unknown process"


class RunLock:
    """Context manager: `with RunLock(output_path, suite, shard="2/4"): ...`."""

    def __init__(self, output_path: str, suite: str, shard: Any = None):
        self.dir = os.path.join(output_path, "runs", suite)
        self.suite = suite
        self.label = shard_label(shard)
        self._fds: list[int] = []

    @property
    def suite_path(self) -> str:
        return os.path.join(self.dir, SUITE_LOCK)

    def shard_path(self, label: str) -> str:
        return os.path.join(self.dir, f".flexgen-run.shard-{label}.lock")

    def _holders(self) -> str:
        """Who holds the suite: the unsharded owner, or every shard whose lock is held."""
        shard_files = sorted(f for f in os.listdir(self.dir) if f.startswith(".flexgen-run.shard-"))
        held = []
        for name in shard_files:
            path = os.path.join(self.dir, name)
            if self._is_held(path):
                held.append(f"shard {name[len('.flexgen-run.shard-'):-len('.lock')].replace('-of-', '/')} "
                            f"({_owner(path)})")
        return "; ".join(held) if held else _owner(self.suite_path)

    @staticmethod
    def _is_held(path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails only while someone holds it exclusively
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _take(self, path: str, exclusive: bool) -> int | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        self._fds.append(fd)
        return fd

    @staticmethod
    def _stamp(fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def acquire(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        what = f"suite {self.suite!r}" + (f" shard {self.label.replace('-of-', '/')}" if self.label else "")
        fd = self._take(self.suite_path, exclusive=self.label is None)
        if fd is None:
            raise RunLockedError(
                f"another flexgen-helm run is writing {self.dir} ({self._holders()}); wait for it to finish, "
                f"use another --suite, or run shards of one suite with --shard I/N")
        if self.label is None:
            self._stamp(fd)
            return
        sfd = self._take(self.shard_path(self.label), exclusive=True)
        if sfd is None:
            owner = _owner(self.shard_path(self.label))
            self.release()
            raise RunLockedError(f"{what} is already running ({owner}); each shard may run only once at a time")
        self._stamp(sfd)

    def release(self) -> None:
        # the files stay (removing a file another process may be about to lock would let two runs
        # lock different inodes); closing the descriptors drops the locks
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
