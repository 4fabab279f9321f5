"""Scale-out flags of `flexgen-helm run` and the `flexgen-helm merge-cache` command."""
from __future__ import annotations

import argparse
import time

from ..engine.config import ConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale out (README: Scaling out)")
    g.add_argument("--shard", metavar="I/N", help="run only shard I of N (1-based); the split is the same everywhere")
    g.add_argument("--slurm", action="store_true", help="submit one Slurm job per shard and follow them")
    g.add_argument("--gpus", metavar="IDS", help="one worker process per listed GPU on this host, e.g. 0,1,2,3")
    g.add_argument("--workers", type=int, metavar="N", help="N worker processes on this host's CPU")
    g.add_argument("--shards", type=int, metavar="N",
                   help="shards for --slurm (default: one per run spec) or --gpus/--workers (default: one per worker)")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="sbatch option for every job (mem=64G, time=12:00:00, partition=gpu, gres=gpu:1); "
                        "wins over slurm_args in <local-path>/runner_config.yaml")
    g.add_argument("--max-jobs", type=int, help="jobs at once (default: 4 for --slurm, one per worker)")
    g.add_argument("--retries", type=int, default=1, help="resubmissions of a failed shard (default 1)")
    g.add_argument("--poll", type=float, default=10.0, help="seconds between job state checks (default 10)")
    g.add_argument("--mongo-uri", metavar="mongodb://HOST/DB",
                   help="HELM's MongoDB request cache, shared by every process, instead of SQLite files")


def is_launch(args: argparse.Namespace) -> bool:
    return bool(args.slurm or args.gpus or args.workers)


def shard_of(args: argparse.Namespace):
    from .shards import Shard

    return Shard.parse(args.shard) if args.shard else None


def check_mongo_uri(uri: str | None) -> None:
    if uri is None:
        return
    from urllib.parse import urlparse

    u = urlparse(uri)
    if u.scheme not in ("mongodb", "mongodb+srv") or not u.path.strip("/"):
        raise ConfigError(f"--mongo-uri must be mongodb://HOST[:PORT]/DATABASE (HELM needs the database name), got {uri!r}")
    try:
        import pymongo  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--mongo-uri needs pymongo ({e}): pip install 'crfm-helm[mongo]'") from e


def launch(args: argparse.Namespace, opts) -> int:
    from .launch import LaunchOptions, launch, print_launch_summary

    if sum(bool(x) for x in (args.slurm, args.gpus, args.workers)) > 1:
        raise ConfigError("choose one of --slurm, --gpus, --workers")
    if args.slurm:
        from .slurm import SlurmBackend, deployment_uses_gpu, job_args, parse_slurm_args

        uses_gpu = deployment_uses_gpu(opts.local_path, opts.model, opts.engine)
        backend = SlurmBackend(opts.suite, job_args(opts.local_path, parse_slurm_args(args.slurm_arg), uses_gpu))
        lo = LaunchOptions(shards=args.shards, max_jobs=args.max_jobs or 4, retries=args.retries, poll_s=args.poll)
    else:
        from .workers import LocalBackend, parse_gpus

        if args.workers is not None and args.workers < 1:
            raise ConfigError("--workers must be >= 1")
        devices = parse_gpus(args.gpus) if args.gpus else [""] * args.workers
        if args.slurm_arg:
            raise ConfigError("--slurm-arg goes with --slurm")
        backend = LocalBackend(devices, cpu=not args.gpus)
        if opts.engine.get("offload_dir"):  # workers of one host map one copy of the host-tier weights
            opts.engine["shared_host_weights"] = True
        else:
            print("flexgen-helm: each worker keeps its own host-tier weights; give --offload-dir to share "
                  "one copy between them (README: Scaling out)")
        lo = LaunchOptions(shards=args.shards or len(devices), max_jobs=min(args.max_jobs or len(devices), len(devices)),
                           retries=args.retries, poll_s=min(args.poll, 1.0))
    summary = launch(opts, backend, lo)
    print_launch_summary(summary, opts)
    return 1 if summary.failed else 0


def after_shard(opts, summary, started: float) -> None:
    """A shard records that it ended normally (see launch.write_result) and says what comes next."""
    from .launch import write_result

    write_result(summary, opts.shard, time.time() - started)
    print(f"shard {opts.shard} done; when every shard has finished: flexgen-helm merge-cache --suite {opts.suite} "
          f"--local-path {opts.local_path}, then helm-summarize")


def _merge_cache(args: argparse.Namespace) -> int:
    import os

    from helm.proxy.services.service import CACHE_DIR

    from .shards import merge_shard_caches

    merged = merge_shard_caches(os.path.join(args.local_path, CACHE_DIR), args.suite)
    if not merged:
        print(f"no shard caches for suite {args.suite} under {args.local_path}/{CACHE_DIR}/shards/")
    for name, n in merged.items():
        print(f"{name}: {n} new rows")
    return 0


def register(subparsers) -> None:
    q = subparsers.add_parser("merge-cache", help="fold the shard caches of a suite into the suite's request cache",
                              description="Run it once every shard of the suite has stopped (one writer per file). "
                                          "--slurm/--gpus/--workers do it for you.")
    q.add_argument("--suite", required=True)
    q.add_argument("--local-path", default="prod_env")
    q.set_defaults(func=_merge_cache)
