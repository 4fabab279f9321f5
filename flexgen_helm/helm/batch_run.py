"""`flexgen-helm run`: a whole conf of HELM sub-scenarios through the engine in shared batches.

1. plan:    HELM adapts every run entry to requests (stock scenarios/adapters; nothing executed).
2. compute: all requests at once: cache hits skipped, the rest grouped by generation parameters
            and bucketed by prompt length across sub-scenarios; every batch is committed to HELM's
            request cache as it finishes (a killed run resumes where it stopped) and logged.
3. score:   HELM runs each entry as usual; every request is now a cache hit, metrics are stock.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import urllib.error
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine.config import ConfigError
from . import shards
from .client import set_engine_overrides
from .shards import Shard
from .timing import TIMING_LOG, TimingObserver

STANDIN_MARKER = "FLEXGEN_STANDIN_DATA.txt"


@dataclass
class RunOptions:
    conf: list[str]
    model: str
    suite: str = "flexgen"
    max_eval_instances: int | None = None  # caps every entry's own max_eval_instances too
    run_entries: list[str] = field(default_factory=list)
    output_path: str = "benchmark_output"
    local_path: str = "prod_env"
    num_threads: int = 4  # HELM's threads for scoring (metrics), not for the engine
    engine: dict[str, Any] = field(default_factory=dict)  # EngineSettings overrides from flags
    verbose: bool = False
    progress: bool = True
    shard: Shard | None = None  # --shard I/N: this process runs part I of N (see shards.py)
    mongo_uri: str | None = None  # --mongo-uri: HELM's MongoDB request cache instead of SQLite files


# ---------------------------------------------------------------------------------------------
# HELM set-up


_BUILTINS_DONE = False


def setup_helm(local_path: str, log_file: str | None, verbose: bool) -> None:
    """Registries and plugins as helm-run sets them up; HELM's chatter goes to log_file."""
    global _BUILTINS_DONE
    from helm.benchmark.config_registry import (register_builtin_configs_from_helm_package,
                                                register_configs_from_directory)
    from helm.benchmark.run import load_entry_point_plugins

    logger = logging.getLogger("helm")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_flexgen", False):
            logger.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(logging.INFO if verbose else logging.ERROR)
    if log_file:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s %(message)s"))
        h._flexgen = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    if not _BUILTINS_DONE:  # registering twice would list every built-in model twice
        register_builtin_configs_from_helm_package()
        load_entry_point_plugins()
        import flexgen_helm.helm.plugin  # noqa: F401  (also when the entry point is not installed)
        _BUILTINS_DONE = True
    register_configs_from_directory(local_path)


def read_entries(conf_paths: list[str], extra: list[str]) -> list[Any]:
    from helm.benchmark.presentation.run_entry import RunEntry, read_run_entries

    for path in conf_paths:
        if not os.path.exists(path):
            raise ConfigError(f"conf file {path} does not exist")
    try:
        entries = list(read_run_entries(conf_paths).entries) if conf_paths else []
    except Exception as e:  # pyhocon / dacite errors: say which file, not a traceback
        raise ConfigError(f"cannot read run entries from {', '.join(conf_paths)}: {type(e).__name__}: {e}. "
                          'Expected HOCON like: entries: [{description: "mmlu:subject=anatomy", priority: 1}]')
    entries += [RunEntry(description=d, priority=1) for d in extra]
    if not entries:
        raise ConfigError("no run entries: pass --conf FILE and/or -r DESCRIPTION")
    return entries


def rewrite_description(description: str, model: str, deployment: str | None, cap: int | None) -> str:
    """Pin the model (and the deployment when it is not the model's default), lower the entry's
    max_eval_instances to `cap`; the rest of the description keeps its order, so run names match
    what stock helm-run gives for the same entry."""
    from helm.common.object_spec import parse_object_spec

    try:
        spec = parse_object_spec(description)
    except Exception as e:
        raise ConfigError(f"run entry {description!r}: {e}") from e
    args = dict(spec.args)
    args["model"] = model
    if deployment:
        args["model_deployment"] = deployment
    else:
        args.pop("model_deployment", None)
    if cap is not None and "max_eval_instances" in args:
        args["max_eval_instances"] = min(int(args["max_eval_instances"]), cap)
    return spec.class_name + ":" + ",".join(f"{k}={v}" for k, v in args.items())


def run_specs_for(entries: list[Any], model: str, deployment: str | None, cap: int | None,
                  num_train_trials: int | None = None) -> list[Any]:
    """RunSpecs for all entries; every bad entry is reported before anything runs."""
    from helm.benchmark.run import run_entries_to_run_specs

    specs, problems = [], []
    for e in entries:
        try:
            desc = rewrite_description(e.description, model, deployment, cap)
            specs += run_entries_to_run_specs([replace(e, description=desc)], max_eval_instances=cap,
                                              num_train_trials=num_train_trials)
        except Exception as ex:  # unknown run spec name, bad argument, ...
            problems.append(f"{e.description!r}: {ex}")
    if problems:
        raise ConfigError("bad run entries (nothing was run):\n  " + "\n  ".join(problems))
    if not specs:
        raise ConfigError("the run entries produced no runs (all filtered out?)")
    return specs


def explain_failure(run_spec: Any, e: BaseException, output_path: str) -> str:
    offline = isinstance(e, (urllib.error.URLError, socket.gaierror, ConnectionError, TimeoutError))
    if offline:
        return (f"its data could not be downloaded ({e}); without network, place the files under "
                f"{os.path.join(output_path, 'scenarios')}/ (see scenarios/README.md; `flexgen-helm demo` "
                "places clearly marked stand-ins)")
    return f"{type(e).__name__}: {e}"


def standin_scenarios(output_path: str) -> list[str]:
    root = os.path.join(output_path, "scenarios")
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, STANDIN_MARKER)))


# ---------------------------------------------------------------------------------------------
# Phase 1: adapt without executing


def _plan_runner_class():
    from helm.benchmark.executor import Executor
    from helm.benchmark.runner import Runner

    from .runner import FlexGenRunner

    class Planned(Exception):
        pass

    class PlanExecutor(Executor):
        captured: Any = None

        def execute(self, scenario_state):  # stop run_one right after adaptation
            self.captured = scenario_state
            raise Planned

    class PlanRunner(FlexGenRunner):
        def __init__(self, execution_spec, *args, **kwargs):
            Runner.__init__(self, execution_spec, *args, **kwargs)
            self.executor = PlanExecutor(execution_spec)
            self._services()

        scratch: str | None = None  # set: run folders during planning go here, not into the suite

        def _get_run_path(self, run_spec) -> str:
            if self.scratch is None:
                return super()._get_run_path(run_spec)
            return os.path.join(self.scratch, run_spec.name)

        def plan(self, run_specs, output_path: str):
            planned, failures = [], {}
            for rs in run_specs:
                try:
                    self.run_one(rs)
                    failures[rs.name] = "HELM returned without adapting it"
                except Planned:
                    states = self.executor.captured.request_states
                    if states:
                        planned.append((rs, states))
                    else:
                        failures[rs.name] = "no eval instances: is its data in place (scenarios/README.md)?"
                except Exception as e:  # noqa: BLE001 - one bad sub-scenario must not stop the others
                    failures[rs.name] = explain_failure(rs, e, output_path)
                finally:
                    path = self._get_run_path(rs)
                    if os.path.isdir(path) and not os.listdir(path):
                        os.rmdir(path)
            return planned, failures

    return PlanRunner


# ---------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    suite_path: str
    timing_log: str
    runs: list[str]
    failures: dict[str, str]
    requests: int = 0
    computed_rows: int = 0
    batches: int = 0
    standins: list[str] = field(default_factory=list)
    # why (first words of the message) -> [requests, an example message]; scored as empty completions
    request_errors: dict[str, list] = field(default_factory=dict)


def run(opts: RunOptions) -> RunSummary:
    # --- faults (issue 14): one run per suite (shards excepted); SIGTERM/SIGINT unwind cleanly ---
    from .client import close_engine
    from .interrupts import terminate_on_signals
    from .cache_check import check_cache_dir
    from .run_lock import RunLock

    read_entries(opts.conf, opts.run_entries)  # a bad conf fails before the lock creates folders
    with RunLock(opts.output_path, opts.suite, opts.shard), terminate_on_signals():
        check_cache_dir(os.path.join(opts.local_path, "cache"))  # HELM's CACHE_DIR; a damaged file stops here
        try:
            return _run(opts)
        except BaseException:  # a signal, a full disk...: remove the offload files now, not at exit
            close_engine()
            raise
        finally:
            set_engine_overrides()  # this run's flags must not reach clients built by a later run
    # --- end faults ---


def _run(opts: RunOptions) -> RunSummary:
    from helm.benchmark.executor import ExecutionSpec
    from helm.benchmark.runner import RunnerError, set_benchmark_output_path
    from helm.common.authentication import Authentication
    from helm.common.cache_backend_config import MongoCacheBackendConfig, SqliteCacheBackendConfig
    from helm.proxy.services.service import CACHE_DIR

    from .prod_env import resolve_model
    from .runner import FlexGenRunner, flexgen_client

    suite_path = os.path.join(opts.output_path, "runs", opts.suite)
    entries = read_entries(opts.conf, opts.run_entries)  # fail on a bad conf before touching anything
    model, deployment, is_default = resolve_model(opts.local_path, opts.model)
    setup_helm(opts.local_path, os.path.join(suite_path, "flexgen_helm_run.log"), opts.verbose)
    os.makedirs(opts.output_path, exist_ok=True)
    set_benchmark_output_path(opts.output_path)
    run_specs = run_specs_for(entries, model, None if is_default else deployment, opts.max_eval_instances)
    set_engine_overrides(**opts.engine)

    cache_dir = os.path.join(opts.local_path, CACHE_DIR)
    # --- scale-out (shards.py): a shard writes only its own SQLite files; MongoDB is shared as is
    own_cache_dir = shards.shard_cache_dir(cache_dir, opts.suite, opts.shard) if opts.shard else cache_dir
    os.makedirs(own_cache_dir, exist_ok=True)
    backend = ({"mongo_cache_backend_config": MongoCacheBackendConfig(opts.mongo_uri)} if opts.mongo_uri else
               {"sqlite_cache_backend_config": SqliteCacheBackendConfig(own_cache_dir)})
    spec = ExecutionSpec(url=None, auth=Authentication(""), local_path=opts.local_path,
                         parallelism=opts.num_threads, dry_run=False, **backend)
    runner_args = (opts.output_path, opts.suite, False, False, False, False, False)
    timing_log = os.path.join(suite_path, shards.timing_log_name(TIMING_LOG, opts.shard))
    summary = RunSummary(suite_path, timing_log, [], {},
                         standins=standin_scenarios(opts.output_path))
    if summary.standins:
        print(f"WARNING: offline STAND-IN data in use for {', '.join(summary.standins)} "
              f"({opts.output_path}/scenarios): scores are not the real benchmark's", file=sys.stderr)

    # 1. plan
    planner = _plan_runner_class()(spec, *runner_args)
    if opts.shard:  # shards plan every run spec: never touch folders another shard is writing
        planner.scratch = os.path.join(suite_path, f".planning-{opts.shard.label}-{os.getpid()}")
    try:
        planned, summary.failures = planner.plan(run_specs, opts.output_path)
    finally:
        if planner.scratch and os.path.isdir(planner.scratch):
            shutil.rmtree(planner.scratch)
    client = flexgen_client(planner.executor.context, deployment)
    if client is None:
        raise ConfigError(f"deployment {deployment} does not use the flexgen client")
    if opts.shard:  # keep this shard's run specs; resume from what the main cache already has
        planned, summary.failures = shards.take_shard(opts.shard, suite_path, client, planned, summary.failures)
        shards.seed_from_main(client, cache_dir, planned)

    # 2. compute, across all planned runs at once
    requests, tags = [], []
    for rs, states in planned:
        requests += [s.request for s in states]
        tags += [rs.name] * len(states)
    summary.requests = len(requests)
    obs = TimingObserver(summary.timing_log, opts.suite, model, deployment, tags, opts.progress)
    try:
        results = client.make_batch_request(requests, observer=obs)
    finally:
        obs.close()
    summary.computed_rows, summary.batches = obs.rows, obs.batches
    for r in results:
        if not r.success:
            entry = summary.request_errors.setdefault(r.error.split(" (")[0], [0, r.error])
            entry[0] += 1

    # 3. score: stock HELM per run, every request a cache hit
    scorer = FlexGenRunner(spec, *runner_args)
    scorer.executor.timing_log = timing_log
    try:
        scorer.run_all([rs for rs, _ in planned])
    except RunnerError as e:
        summary.failures["scoring"] = str(e)
    summary.runs = [rs.name for rs, _ in planned if os.path.exists(os.path.join(suite_path, rs.name, "stats.json"))]
    for rs, _ in planned:
        if rs.name not in summary.runs:
            summary.failures.setdefault(rs.name, "scoring failed: see flexgen_helm_run.log")
    return summary


def print_summary(s: RunSummary, output_path: str, suite: str) -> None:
    print(f"{len(s.runs)} runs written to {s.suite_path}/ ({s.requests} requests; {s.computed_rows} rows computed "
          f"in {s.batches} engine batches, the rest from the cache)")
    print(f"timing log: {s.timing_log}")
    for n, example in s.request_errors.values():
        print(f"{n} requests could not be served (scored as empty completions), e.g.: {example}", file=sys.stderr)
    for name, why in s.failures.items():
        print(f"FAILED {name}: {why}", file=sys.stderr)
    print(f"next: helm-summarize --suite {suite} -o {output_path}")
