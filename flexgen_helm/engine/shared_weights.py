"""One read-only file of host-tier weights, mapped by every engine on a host that serves the same
model under the same placement, so the page cache holds one copy instead of one per process.

Files in the user's offload directory, named by a hash of everything that decides the bytes:
- `flexgen-shared-<key>.weights`: the segments back to back (4 KB aligned), complete once renamed
  into place. Every engine using it holds a shared `flock` on it while open.
- `flexgen-shared-<key>.lock`: serializes builders and removers. The first engine builds the file
  under it (temp name, fsync, rename); the others wait for the lock, then map what it wrote.

On close an engine removes both files when, under the lock, it can take the data file's exclusive
lock without waiting: nobody else holds a shared one, so it was the last user.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import mmap
import os
import warnings

import torch

from .config import ConfigError

PREFIX = "flexgen-shared-"


def shared_key(parts: list[object]) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _locked_lock_file(path: str) -> int:
    """fd of `path` under an exclusive flock. Retries when a remover unlinked the file while we
    waited (our lock would then guard an orphan while a newcomer creates a fresh file)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


class SharedHostFile:
    """Open (and, when first, build) the shared file for `key` holding `nbytes`.

    After construction `needs_build` says whether this process writes the contents (`write`, then
    `finish`); `finish` returns the read-only uint8 tensor over the whole file in both cases.
    """

    def __init__(self, directory: str | None, key: str, nbytes: int):
        if directory is None or not os.path.isdir(directory):
            raise ConfigError("shared host weights live in the offload directory: pass offload_dir "
                              "(--offload-dir) naming an existing directory on this host")
        self.path = os.path.join(directory, f"{PREFIX}{key}.weights")
        self.lock_path = os.path.join(directory, f"{PREFIX}{key}.lock")
        self.nbytes = nbytes
        self.data_fd: int | None = None
        self.tmp_fd: int | None = None
        self.tmp_path = f"{self.path}.{os.getpid()}.tmp"
        self.tensor: torch.Tensor | None = None
        self.closed = False
        self.lock_fd: int | None = _locked_lock_file(self.lock_path)  # held until finish()
        for stale in glob.glob(glob.escape(self.path) + ".*.tmp"):  # a builder killed mid-way (it held the lock)
            os.remove(stale)
        try:
            if os.path.exists(self.path):
                if os.path.getsize(self.path) != nbytes:  # same name, other bytes: a stale or foreign file
                    self.closed = True  # leave it alone: the message tells the user what to do
                    self._unlock()
                    raise ConfigError(f"{self.path} has {os.path.getsize(self.path)} bytes, expected {nbytes}; "
                                      "remove it (no engine may be running on it) and rerun")
                self.needs_build = False
            else:
                self.needs_build = True
                self.tmp_fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                os.ftruncate(self.tmp_fd, nbytes)
        except BaseException:
            self.close()
            raise

    def write(self, offset: int, data: torch.Tensor) -> None:
        mv = memoryview(data.contiguous().numpy())
        done = 0
        while done < len(mv):
            done += os.pwrite(self.tmp_fd, mv[done:], offset + done)

    def finish(self) -> torch.Tensor:
        if self.needs_build:
            os.fsync(self.tmp_fd)  # complete on disk before the name appears
            os.close(self.tmp_fd)
            self.tmp_fd = None
            os.rename(self.tmp_path, self.path)
        self.data_fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self.data_fd, fcntl.LOCK_SH)  # never waits: removers hold the lock file we hold
        # mapped through another open file: mmap keeps (a dup of) its fd, and a lock on that one
        # would outlive close() for as long as any view of the weights does
        map_fd = os.open(self.path, os.O_RDONLY)
        try:
            mm = mmap.mmap(map_fd, self.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(map_fd)
        with warnings.catch_warnings():  # read-only on purpose: a stray write must fault, not corrupt others
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(mm, dtype=torch.uint8)
        t._mmap_owner = mm  # the mapping lives as long as any view of it
        self.tensor = t
        self._unlock()
        return t

    def _unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the only fd drops the flock
            self.lock_fd = None

    def close(self) -> None:
        """Drop our use; the last user removes the files. Views of `tensor` stay valid until
        dropped (the mapping outlives the name)."""
        if self.closed:
            return
        self.closed = True
        self.tensor = None
        if self.tmp_fd is not None:  # building failed: nobody saw the temp file
            os.close(self.tmp_fd)
            self.tmp_fd = None
            try:
                os.remove(self.tmp_path)
            except FileNotFoundError:
                pass
        if self.lock_fd is None:
            self.lock_fd = _locked_lock_file(self.lock_path)
        try:
            if self.data_fd is not None:
                os.close(self.data_fd)  # our shared lock goes with it
                self.data_fd = None
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                fd = None
            last = True
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    last = False  # another engine still maps it
                finally:
                    os.close(fd)
            if last:
                for p in (self.path, self.lock_path):  # the lock file last: waiters then retry on a fresh one
                    try:
                        os.remove(p)
                    except FileNotFoundError:
                        pass
        finally:
            self._unlock()
