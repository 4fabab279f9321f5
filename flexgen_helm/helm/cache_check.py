"""Refuse a damaged request cache instead of letting it be recreated or half-read.

HELM opens its SQLite cache with `SqliteDict`, which creates a missing file and, on a damaged one,
fails deep inside a background thread (or, for a truncated file, only when a lookup reaches a lost
page). A 20-hour evaluation's results live in that file, so before the first lookup each cache file
is opened read-only and checked (`PRAGMA quick_check`); a damaged one stops the run with its path.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from ..engine.config import ConfigError

_CHECKED: set[str] = set()
_LOCK = threading.Lock()


class CorruptCacheError(ConfigError):
    pass


def check_sqlite_file(path: str) -> None:
    """Raise CorruptCacheError unless `path` is absent or a readable, intact SQLite database."""
    if not os.path.exists(path):
        return  # a first run: HELM creates it
    problem = None
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
            if [r[0] for r in rows] != ["ok"]:
                problem = "; ".join(str(r[0]) for r in rows[:3])
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            raise  # busy, not damaged: let the caller's retry logic see it
        problem = str(e)
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        problem = str(e)
    if problem is not None:
        raise CorruptCacheError(
            f"the request cache {path} is damaged ({problem}). It was left untouched, and nothing was computed. "
            f"Restore it from a backup, or move it aside (e.g. `mv {path} {path}.bad`) to start with an empty "
            "cache: the results cached in it are then recomputed")


def check_request_cache(config: Any) -> None:
    """Check a HELM cache config's SQLite file once per process."""
    path = getattr(config, "path", None)
    if not path:
        return  # Mongo or no cache
    with _LOCK:
        if path in _CHECKED:
            return
        check_sqlite_file(path)
        _CHECKED.add(path)


def check_cache_dir(directory: str) -> None:
    """Check every SQLite cache file HELM keeps in `directory` (`<local_path>/cache`). HELM's own
    tokenizer cache shares our file (same host organization) and is opened while planning, so
    this runs before anything else touches them."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if name.endswith(".sqlite"):
            path = os.path.join(directory, name)
            with _LOCK:
                if path in _CHECKED:
                    continue
                check_sqlite_file(path)
                _CHECKED.add(path)
