"""Run every shard of a suite as its own `flexgen-helm run --shard I/N` process, somewhere else:
Slurm jobs (`slurm.py`) or local worker processes, one per device (`workers.py`).

The loop here knows nothing of where a shard runs: it submits up to `max_jobs` shards, polls their
state, shows one progress line, resubmits a failed shard up to `retries` times (it resumes from its
cache), cancels everything on Ctrl-C, then folds the shard caches into the suite's cache and runs
helm-summarize.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..engine.config import ConfigError
from . import shards
from .batch_run import RunOptions
from .interrupts import deferred_signals, terminate_on_signals
from .shards import Shard

RESULT_DIR = "scaleout"  # under the suite folder: job logs and one result file per finished shard


class Backend(Protocol):
    name: str

    def submit(self, shard: Shard, argv: list[str], log_path: str) -> Any:
        """Start the shard; returns a handle."""

    def state(self, handle: Any) -> str:
        """'queued', 'running', 'done' or 'failed'."""

    def cancel(self, handle: Any) -> None:
        ...


@dataclass
class LaunchOptions:
    shards: int | None = None  # default: one shard per run spec
    max_jobs: int = 4
    retries: int = 1
    poll_s: float = 10.0
    summarize: bool = True


# ---------------------------------------------------------------------------------------------
# The shard's command line and its result file


def shard_argv(opts: RunOptions, shard: Shard) -> list[str]:
    """`flexgen-helm run` for one shard, with every path absolute (a job may start elsewhere)."""
    a = [sys.executable, "-m", "flexgen_helm.cli", "run", "--model", opts.model, "--suite", opts.suite,
         "-o", os.path.abspath(opts.output_path), "--local-path", os.path.abspath(opts.local_path),
         "-n", str(opts.num_threads), "--no-progress", "--shard", str(shard)]
    if opts.conf:
        a += ["--conf", *[os.path.abspath(c) for c in opts.conf]]
    if opts.run_entries:
        a += ["-r", *opts.run_entries]
    if opts.max_eval_instances is not None:
        a += ["-m", str(opts.max_eval_instances)]
    if opts.mongo_uri:
        a += ["--mongo-uri", opts.mongo_uri]
    if opts.verbose:
        a.append("--verbose")
    eng = dict(opts.engine)
    if eng.pop("compress_weight", False) | eng.pop("compress_cache", False):
        a.append("--compress")
    for key, value in eng.items():
        flag = "--" + key.replace("_", "-")
        if value is True:  # a switch
            a.append(flag)
        elif key == "percent":
            a += [flag, *(f"{x:g}" for x in value)]
        elif key in ("offload_dir", "policy") and os.path.exists(str(value)):
            a += [flag, os.path.abspath(value)]
        else:
            a += [flag, str(value)]
    return a


def result_path(suite_path: str, shard: Shard) -> str:
    return os.path.join(suite_path, RESULT_DIR, f"{shard.label}.result.json")


def write_result(summary: Any, shard: Shard, wall_s: float) -> None:
    """Written by the shard when it ends normally, also when some run failed: the launcher then
    knows that a non-zero exit was a reported failure (no retry helps) and not a crash."""
    path = result_path(summary.suite_path, shard)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = {"shard": str(shard), "runs": summary.runs, "failures": summary.failures,
            "requests": summary.requests, "computed_rows": summary.computed_rows, "wall_s": wall_s,
            "host": os.uname().nodename, "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
    os.replace(tmp, path)


def read_result(suite_path: str, shard: Shard) -> dict | None:
    try:
        with open(result_path(suite_path, shard)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------


def count_run_specs(opts: RunOptions) -> int:
    """How many run specs the conf gives (the default shard count); also checks the conf and model
    before anything is submitted."""
    from .batch_run import read_entries, run_specs_for, setup_helm
    from .prod_env import resolve_model

    entries = read_entries(opts.conf, opts.run_entries)
    model, deployment, is_default = resolve_model(opts.local_path, opts.model)
    setup_helm(opts.local_path, None, opts.verbose)
    return len(run_specs_for(entries, model, None if is_default else deployment, opts.max_eval_instances))


@dataclass
class _Job:
    shard: Shard
    attempts: int = 0
    handle: Any = None
    state: str = "waiting"  # waiting (not submitted yet) | queued | running | done | failed
    started: float = 0.0
    log: str = ""


@dataclass
class LaunchSummary:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard -> why
    resubmitted: int = 0
    merged_rows: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One line: done/running/queued/failed and an ETA. Predicted times (from the recorded split) are
    scaled by how long finished shards really took relative to their prediction."""

    def __init__(self, backend: str, suite_path: str, count: int, stream: Any = None):
        self.backend, self.suite_path, self.count = backend, suite_path, count
        self.stream = stream or sys.stderr
        self.last = ""
        self.printed = 0.0
        self.every_s = 30.0
        self.predicted: dict[str, float] | None = None

    def _shard_predictions(self) -> dict[str, float] | None:
        if self.predicted is None:
            try:
                with open(shards.plan_path(self.suite_path, self.count)) as f:
                    plan = json.load(f)
                self.predicted = {Shard(i + 1, self.count).label: sum(plan["predicted_s"].get(n, 0.0) for n in names)
                                  for i, names in enumerate(plan["shards"])}
            except (OSError, ValueError, KeyError):
                return None
        return self.predicted

    def eta(self, jobs: list[_Job], parallel: int, now: float) -> str:
        pred = self._shard_predictions()
        if not pred:
            return "ETA once a shard has planned"
        finished = [(j, read_result(self.suite_path, j.shard)) for j in jobs if j.state == "done"]
        pairs = [(r["wall_s"], pred[j.shard.label]) for j, r in finished if r and pred.get(j.shard.label)]
        if not pairs:
            return f"{sum(pred.values()):.3g} s of predicted work on the reference profile; ETA after the first shard ends"
        scale = sum(a for a, _ in pairs) / sum(p for _, p in pairs)
        left = 0.0
        for j in jobs:
            if j.state in ("waiting", "queued"):
                left += pred.get(j.shard.label, 0.0) * scale
            elif j.state == "running":
                left += max(0.0, pred.get(j.shard.label, 0.0) * scale - (now - j.started))
        return f"ETA {_fmt_s(left / max(1, parallel))}"

    def show(self, jobs: list[_Job], parallel: int, force: bool = False) -> None:
        """On a terminal the line is redrawn in place; in a log, a line when the counts change or
        every `every_s` seconds."""
        n = {s: sum(j.state == s for j in jobs) for s in ("done", "running", "queued", "waiting", "failed")}
        counts = (f"[{self.backend}] {n['done']}/{len(jobs)} done, {n['running']} running, "
                  f"{n['queued'] + n['waiting']} queued, {n['failed']} failed")
        tty = self.stream.isatty()
        if not (tty or force or counts != self.last or time.time() - self.printed > self.every_s):
            return
        line = f"{counts}; {self.eta(jobs, parallel, time.time())}"
        print(("\r\033[K" + line) if tty else line, end="" if tty and not force else "\n", file=self.stream,
              flush=True)
        self.last, self.printed = counts, time.time()


def _follow(backend: Backend, opts: RunOptions, lo: LaunchOptions, suite_path: str, jobs: list[_Job],
            progress: Progress, count: int, summary: LaunchSummary) -> None:
    """Submit shards (at most lo.max_jobs at a time) and poll them until none is waiting, queued or
    running; failed shards are resubmitted up to lo.retries times (they resume from their caches)."""
    while any(j.state in ("waiting", "queued", "running") for j in jobs):
        active = sum(j.state in ("queued", "running") for j in jobs)
        for j in jobs:
            if j.state == "waiting" and active < lo.max_jobs:
                with deferred_signals():
                    _submit(backend, opts, suite_path, j)
                active += 1
        progress.show(jobs, min(lo.max_jobs, count))
        time.sleep(lo.poll_s)
        for j in jobs:
            if j.state not in ("queued", "running"):
                continue
            with deferred_signals():
                state = backend.state(j.handle)
            if state == "running" and j.state == "queued":
                j.started = time.time()
            if state == "failed" and read_result(suite_path, j.shard) is not None:
                state = "done"  # it ended normally and reported its failed runs: a retry cannot help
            if state == "failed" and j.attempts <= lo.retries:
                print(f"[{backend.name}] shard {j.shard} failed (attempt {j.attempts}, log {j.log}); "
                      "resubmitting: it resumes from its cache", file=sys.stderr, flush=True)
                summary.resubmitted += 1
                state = "waiting"
            elif state == "failed":
                summary.failed[str(j.shard)] = f"failed {j.attempts} time(s); last log: {j.log}"
            j.state = state
    progress.show(jobs, min(lo.max_jobs, count), force=True)


def launch(opts: RunOptions, backend: Backend, lo: LaunchOptions) -> LaunchSummary:
    if opts.shard is not None:
        raise ConfigError("--shard is what the launcher passes to each job: do not combine it with --slurm/--workers")
    if lo.max_jobs < 1 or lo.retries < 0:
        raise ConfigError("--max-jobs must be >= 1 and --retries >= 0")
    count = lo.shards or count_run_specs(opts)
    if count < 1:
        raise ConfigError("--shards must be >= 1")
    suite_path = os.path.join(opts.output_path, "runs", opts.suite)
    os.makedirs(os.path.join(suite_path, RESULT_DIR), exist_ok=True)
    jobs = [_Job(Shard(i, count)) for i in range(1, count + 1)]
    progress = Progress(backend.name, suite_path, count)
    summary = LaunchSummary()
    t0 = time.time()
    try:
        # Ctrl-C / SIGTERM are held while a backend call runs, then raised: HELM's Slurm helpers retry
        # on any exception (`retrying` catches KeyboardInterrupt too), so a Ctrl-C landing inside
        # scontrol was swallowed and the launcher kept polling with its jobs alive.
        with terminate_on_signals():
            _follow(backend, opts, lo, suite_path, jobs, progress, count, summary)
    except KeyboardInterrupt:
        live = [j for j in jobs if j.state in ("queued", "running")]
        for j in live:
            backend.cancel(j.handle)
        print(f"\n[{backend.name}] interrupted: cancelled {len(live)} job(s); finished batches are in the shard "
              "caches, the same command resumes", file=sys.stderr, flush=True)
        raise
    summary.done = [str(j.shard) for j in jobs if j.state == "done"]
    for j in jobs:
        r = read_result(suite_path, j.shard)
        for name, why in (r or {}).get("failures", {}).items():
            summary.failed[f"{j.shard} {name}"] = why
    if not opts.mongo_uri:  # one writer now: every shard has stopped
        from helm.proxy.services.service import CACHE_DIR
        summary.merged_rows = shards.merge_shard_caches(os.path.join(opts.local_path, CACHE_DIR), opts.suite)
    if lo.summarize and summary.done:
        summarize(opts)
    summary.wall_s = time.time() - t0
    return summary


def _submit(backend: Backend, opts: RunOptions, suite_path: str, j: _Job) -> None:
    try:
        os.remove(result_path(suite_path, j.shard))  # a result file must come from this attempt
    except FileNotFoundError:
        pass
    j.attempts += 1
    j.log = os.path.join(suite_path, RESULT_DIR, f"{j.shard.label}.attempt{j.attempts}.log")
    j.handle = backend.submit(j.shard, shard_argv(opts, j.shard), j.log)
    j.state, j.started = "queued", time.time()


def summarize(opts: RunOptions) -> None:
    cmd = [sys.executable, "-m", "helm.benchmark.presentation.summarize", "--suite", opts.suite,
           "-o", opts.output_path, "--local-path", opts.local_path]
    print(f"running: {shlex.join(cmd[2:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)


def print_launch_summary(s: LaunchSummary, opts: RunOptions) -> None:
    print(f"{len(s.done)} shard(s) finished in {s.wall_s:.1f} s ({s.resubmitted} resubmission(s)); runs in "
          f"{os.path.join(opts.output_path, 'runs', opts.suite)}/")
    if s.merged_rows:
        print("shard caches merged into the suite's cache: " +
              ", ".join(f"{n}: {k} new rows" for n, k in s.merged_rows.items()))
    for name, why in s.failed.items():
        print(f"FAILED {name}: {why}", file=sys.stderr)
