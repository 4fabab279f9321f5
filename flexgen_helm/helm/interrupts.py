"""SIGTERM (Slurm preemption) and SIGINT (Ctrl-C) during a long run: stop within seconds, cleanly.

Python's default SIGTERM kills the process on the spot: no `finally`, no `atexit`, so the offload
directory keeps tens of GB of weights. Under `terminate_on_signals()` both signals instead raise
`RunInterrupted` in the main thread, which unwinds through every `finally` (the engine closes and
removes its offload files). Code that must not be cut in half (committing a batch to the request
cache and its timing-log line) runs under `deferred_signals()`: a signal arriving there is raised
when the section ends, so a batch is either committed whole or not at all.

A second signal while the first is being handled gets the previous (default) behaviour, so a user
can still force an exit from a cleanup that hangs.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGINT. A KeyboardInterrupt, so HELM's broad
    `except Exception` handlers let it through."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for death by this signal


class _State:
    depth = 0  # nesting of deferred sections in the main thread
    pending: int | None = None
    previous: dict[int, object] = {}
    active = False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore() -> None:
    for s, h in _State.previous.items():
        signal.signal(s, h)  # type: ignore[arg-type]
    _State.previous = {}
    _State.active = False


def _handler(signum: int, frame: object) -> None:
    if _State.depth > 0:
        _State.pending = signum
        return
    _restore()  # the next signal is not deferred
    raise RunInterrupted(signum)


@contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into `RunInterrupted` for the duration (main thread only; elsewhere a
    no-op, since Python delivers signals to the main thread)."""
    if not _in_main_thread() or _State.active:
        yield
        return
    _State.previous = {s: signal.getsignal(s) for s in SIGNALS}
    _State.active, _State.pending, _State.depth = True, None, 0
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        if _State.active:
            _restore()


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold a SIGTERM/SIGINT that arrives inside the block until the block has finished."""
    if not _in_main_thread() or not _State.active:
        yield
        return
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if _State.depth == 0 and _State.pending is not None:
            signum, _State.pending = _State.pending, None
            _restore()
            raise RunInterrupted(signum)
