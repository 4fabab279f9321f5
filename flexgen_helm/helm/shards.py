"""`flexgen-helm run --shard I/N`: which run specs a shard runs, and where its cache lives.

The split must be the same on every machine, whatever its hardware, so run specs are weighted by the
policy search's predicted time under one fixed, shipped hardware profile (only the ratios between
sub-scenarios matter for balance), then dealt out longest first to the least-loaded shard. The first
shard to start records the split next to the runs; a shard that computes a different one (other conf,
model, -m or engine flags) stops before doing any work.

Each shard writes its own SQLite request cache (no file is written by two processes: no "database is
locked", no NFS corruption). A shard first copies its hits from the suite's main cache, so it resumes
like a normal run; `merge_shard_caches` folds every shard's cache into the main one at the end. Rows
are copied as stored (SQL level), never unpickled.
"""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..engine.config import ConfigError

PLAN_PROFILE = "t4-gcp"  # fixed reference hardware for the split: the same answer on every machine
SHARD_CACHE_DIR = "shards"  # under <local_path>/cache/
SQLITE_TABLE = "unnamed"  # SqliteDict's default table, which HELM's cache uses


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        i, sep, n = text.partition("/")
        try:
            shard = cls(int(i), int(n))
        except ValueError:
            shard = None
        if not sep or shard is None or not 1 <= shard.index <= shard.count:
            raise ConfigError(f"--shard takes I/N with 1 <= I <= N (e.g. 2/4), got {text!r}")
        return shard

    @property
    def label(self) -> str:
        """Names the shard's cache folder, timing log and (issue 14) its run lock."""
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def assign(costs: dict[str, float], count: int) -> list[list[str]]:
    """Longest-processing-time-first: deterministic (ties broken by name, then shard index)."""
    shards: list[list[str]] = [[] for _ in range(count)]
    loads = [0.0] * count
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        k = min(range(count), key=lambda j: (loads[j], j))
        shards[k].append(name)
        loads[k] += costs[name]
    return shards


# ---------------------------------------------------------------------------------------------
# Predicted time per run spec


@dataclass(frozen=True)
class Workload:
    """One generation-parameter group of a run spec: what the cost model needs."""

    prompt_len: int  # longest prompt in tokens
    gen_len: int
    rows: int  # engine rows


def run_spec_workloads(client: Any, requests: Sequence[Any]) -> list[Workload]:
    from .batching import GenParams

    groups: dict[GenParams, list[int]] = {}
    with client._tokenizer() as tok:
        for r in requests:
            ids, _ = client._encode(tok, r.prompt)
            groups.setdefault(GenParams.from_request(r), []).append(len(ids))
    return [Workload(max(lens), p.max_tokens, len(lens) * p.rows_per_prompt) for p, lens in groups.items()]


def predict_times(client: Any, planned: Sequence[tuple[Any, Sequence[Any]]]) -> dict[str, float]:
    """Predicted seconds per run spec on the reference profile (the policy search's cost model)."""
    from ..engine.model_spec import load_spec
    from ..policy.profiler import load_profile
    from ..policy.search import SubScenario, predict_benchmark
    from .client import resolve_policy

    s = client.settings
    spec, hw = load_spec(s.model_path), load_profile(PLAN_PROFILE)
    policy = resolve_policy(s)
    fixed = None if isinstance(policy, str) else policy
    times: dict[str, float] = {}
    for rs, states in planned:
        subs = [SubScenario(rs.name, w.prompt_len, max(w.gen_len, 1), w.rows, fixed)
                for w in run_spec_workloads(client, [st.request for st in states])]
        rows = predict_benchmark(spec, subs, hw, s.budget, dtype_bytes=2,
                                 allow_compression=s.compress_weight or s.compress_cache)
        times[rs.name] = sum(r["predicted_s"] for r in rows)
    return times


# ---------------------------------------------------------------------------------------------
# The recorded split


def plan_path(suite_path: str, count: int) -> str:
    return os.path.join(suite_path, f"shard_plan-{count}.json")


def record_plan(suite_path: str, count: int, shards: list[list[str]], times: dict[str, float]) -> str:
    """Write the split once (atomically); if another shard already wrote it, it must be the same."""
    path = plan_path(suite_path, count)
    os.makedirs(suite_path, exist_ok=True)
    body = {"count": count, "profile": PLAN_PROFILE, "shards": shards,
            "predicted_s": {n: round(t, 6) for n, t in times.items()}}
    fd, tmp = tempfile.mkstemp(prefix=".shard_plan", dir=suite_path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
        try:
            os.link(tmp, path)  # fails if it exists: the first writer wins, no partial file is ever seen
            return path
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    with open(path) as f:
        recorded = json.load(f)["shards"]
    if recorded != shards:
        raise ConfigError(f"this shard computes a different split than the one recorded in {path}: all shards of "
                          "a suite must run the same conf, --model, -m and engine flags (delete the file only if "
                          "you changed them on purpose and no shard of the old split is still running)")
    return path


def select(planned: list[tuple[Any, Any]], shards: list[list[str]], shard: Shard) -> list[tuple[Any, Any]]:
    mine = set(shards[shard.index - 1])
    return [(rs, st) for rs, st in planned if rs.name in mine]


# ---------------------------------------------------------------------------------------------
# Per-shard SQLite caches


def shard_cache_dir(cache_dir: str, suite: str, shard: Shard) -> str:
    return os.path.join(cache_dir, SHARD_CACHE_DIR, suite, shard.label)


def _has_table(db: sqlite3.Connection, schema: str) -> bool:
    q = f"SELECT 1 FROM {schema}.sqlite_master WHERE type='table' AND name=?"
    return db.execute(q, (SQLITE_TABLE,)).fetchone() is not None


def _copy_rows(src: str, dst: str, keys: Iterable[str] | None, replace_existing: bool) -> int:
    """Copy rows (key TEXT, value BLOB) from src into dst without decoding them; only `keys` if given."""
    if not os.path.exists(src):
        return 0
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    with sqlite3.connect(dst, timeout=60) as db:
        db.execute(f'CREATE TABLE IF NOT EXISTS "{SQLITE_TABLE}" (key TEXT PRIMARY KEY, value BLOB)')
        db.execute("ATTACH DATABASE ? AS src", (src,))
        try:
            if not _has_table(db, "src"):
                return 0
            verb = "INSERT OR REPLACE" if replace_existing else "INSERT OR IGNORE"
            where = ""
            if keys is not None:
                db.execute("CREATE TEMP TABLE wanted (key TEXT PRIMARY KEY)")
                db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((k,) for k in keys))
                where = " WHERE key IN (SELECT key FROM wanted)"
            cur = db.execute(f'{verb} INTO main."{SQLITE_TABLE}" SELECT key, value FROM src."{SQLITE_TABLE}"{where}')
            db.commit()
            return cur.rowcount
        finally:
            db.commit()
            db.execute("DETACH DATABASE src")


def seed_shard_cache(main_dir: str, shard_dir: str, cache_file: str, keys: Iterable[str]) -> int:
    """Copy the main cache's answers to this shard's requests into the shard's own file (resume)."""
    return _copy_rows(os.path.join(main_dir, cache_file), os.path.join(shard_dir, cache_file), keys, False)


def merge_shard_caches(cache_dir: str, suite: str) -> dict[str, int]:
    """Fold every shard cache of `suite` into the main cache files; returns rows copied per file.
    Run it when no shard of the suite is running (one writer per file)."""
    root = os.path.join(cache_dir, SHARD_CACHE_DIR, suite)
    copied: dict[str, int] = {}
    if not os.path.isdir(root):
        return copied
    for label in sorted(os.listdir(root)):
        d = os.path.join(root, label)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if name.endswith(".sqlite"):
                n = _copy_rows(os.path.join(d, name), os.path.join(cache_dir, name), None, False)
                copied[name] = copied.get(name, 0) + n
    return copied


# ---------------------------------------------------------------------------------------------
# What `flexgen-helm run --shard` does between planning and computing


def timing_log_name(base: str, shard: Shard | None) -> str:
    """flexgen_timing.jsonl -> flexgen_timing.shard-2-of-4.jsonl: one writer per file."""
    if shard is None:
        return base
    stem, ext = os.path.splitext(base)
    return f"{stem}.{shard.label}{ext}"


def take_shard(shard: Shard, suite_path: str, client: Any, planned: list[tuple[Any, Any]],
               failures: dict[str, str]) -> tuple[list[tuple[Any, Any]], dict[str, str]]:
    """This shard's part of the planned run specs (and of the planning failures: shard 1 reports
    the run specs that could not be planned, so they are reported once)."""
    times = predict_times(client, planned)
    split = assign(times, shard.count)
    record_plan(suite_path, shard.count, split, times)
    return select(planned, split, shard), (failures if shard.index == 1 else {})


def seed_from_main(client: Any, main_cache_dir: str, planned: list[tuple[Any, Any]]) -> int:
    """Copy the main cache's rows for this shard's requests into its own cache file."""
    config = getattr(client.cache, "config", None)
    path = getattr(config, "path", None)  # SQLite only; MongoDB is one shared store already
    if path is None:
        return 0
    keys = [json.dumps(client.cache_key(st.request), sort_keys=True) for _, states in planned for st in states]
    return seed_shard_cache(main_cache_dir, os.path.dirname(path), os.path.basename(path), keys)

