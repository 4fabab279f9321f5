"""`flexgen-helm run` and `flexgen-helm prod-env`."""
from __future__ import annotations

import argparse
import os
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (override the deployment's client_spec args)")
    g.add_argument("--gpu-mem", help="compute-device budget, e.g. 16GB")
    g.add_argument("--cpu-mem", help="host-memory budget, e.g. 200GB")
    g.add_argument("--disk-mem", help="disk budget, e.g. 1.5TB")
    g.add_argument("--policy", help="'auto' (policy search under the budgets) or a policy JSON file")
    g.add_argument("--percent", nargs=6, type=float, metavar="P",
                   help="FlexGen placement: w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu")
    g.add_argument("--gpu-batch-size", type=int)
    g.add_argument("--num-gpu-batches", type=int)
    g.add_argument("--compress", action="store_true", help="4-bit group-wise weights and KV cache")
    g.add_argument("--device", help="cpu | cuda[:i] (default: cuda when visible)")
    g.add_argument("--dtype", help="float16 | bfloat16 | float32 (default: fp16 on CUDA; on CPU bf16 with AVX512-BF16/AMX, else fp32)")
    g.add_argument("--offload-dir", help="directory for the disk tier")
    g.add_argument("--shared-host-weights", action="store_true",
                   help="keep the host-tier weights in one read-only file in --offload-dir, mapped by every "
                        "process of this host serving the same model (on by default for --gpus/--workers)")


def engine_overrides(args: argparse.Namespace) -> dict:
    kw = {"gpu_mem": args.gpu_mem, "cpu_mem": args.cpu_mem, "disk_mem": args.disk_mem, "policy": args.policy,
          "percent": tuple(args.percent) if args.percent else None, "gpu_batch_size": args.gpu_batch_size,
          "num_gpu_batches": args.num_gpu_batches, "device": args.device, "dtype": args.dtype,
          "offload_dir": args.offload_dir, "shared_host_weights": args.shared_host_weights or None}
    if args.compress:
        kw.update(compress_weight=True, compress_cache=True)
    return {k: v for k, v in kw.items() if v is not None}


def _run(args: argparse.Namespace) -> int:
    from ..distributed.helm_serve import finish, serve_forever, world_size
    if world_size() > 1:  # under torchrun: rank 0 runs HELM on a pipelined model, the others serve it
        import torch
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # as the client's "auto"
        if int(os.environ.get("RANK", "0")) > 0:
            return serve_forever(device)
        try:
            return _run_helm(args)
        finally:
            from .client import close_engine
            close_engine()
            finish(device)
    return _run_helm(args)


def _run_helm(args: argparse.Namespace) -> int:
    import time

    from . import scaleout_cli
    from .batch_run import RunOptions, print_summary, run

    scaleout_cli.check_mongo_uri(args.mongo_uri)
    opts = RunOptions(conf=args.conf or [], run_entries=args.run_entries or [], model=args.model,
                      suite=args.suite, max_eval_instances=args.max_eval_instances,
                      output_path=args.output_path, local_path=args.local_path, num_threads=args.num_threads,
                      engine=engine_overrides(args), verbose=args.verbose, progress=not args.no_progress,
                      shard=scaleout_cli.shard_of(args), mongo_uri=args.mongo_uri)
    if scaleout_cli.is_launch(args):  # --slurm / --gpus / --workers: this process only follows the shards
        try:
            return scaleout_cli.launch(args, opts)
        except KeyboardInterrupt as e:  # the launcher has cancelled its jobs
            return getattr(e, "exit_code", 130)
    from .interrupts import RunInterrupted
    started = time.time()
    try:
        summary = run(opts)
    except RunInterrupted as e:  # SIGTERM (preemption) or Ctrl-C: committed batches are in the cache
        print(f"flexgen-helm run: stopped by {e.name}; every finished batch is in the request cache and "
              "the offload files are removed; rerun the same command to resume", file=sys.stderr)
        return e.exit_code
    print_summary(summary, args.output_path, args.suite)
    if opts.shard:
        scaleout_cli.after_shard(opts, summary, started)
    return 1 if summary.failures or summary.request_errors else 0


def _prod_env(args: argparse.Namespace) -> int:
    from ..engine.config import ConfigError
    from .prod_env import write_prod_env

    checkpoints = {}
    for item in args.checkpoint or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--checkpoint takes NAME=DIR (e.g. opt-30b=/weights/opt-30b), got {item!r}")
        checkpoints[name] = path
    if args.tiny:
        from ..tiny import DEMO_MODEL, demo_model_dir
        checkpoints.setdefault(DEMO_MODEL, demo_model_dir())
    for path in write_prod_env(args.out, checkpoints, args.weights_root):
        print(path)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a HELM conf through the engine in shared, length-bucketed batches",
        description="Plan every run entry with HELM, compute all requests in batches shared across "
                    "sub-scenarios (each batch saved to HELM's cache as it finishes, so a killed run "
                    "resumes), then let HELM score every run from the cache.")
    p.add_argument("--conf", "-c", nargs="+", help="HELM run-entries conf file(s), e.g. run_specs.conf")
    p.add_argument("-r", "--run-entries", nargs="+", help="extra run entries, e.g. mmlu:subject=anatomy")
    p.add_argument("--model", required=True,
                   help="flexgen deployment (flexgen/opt-30b, flexgen/llama-3.1-8b-4bit), a public size "
                        "(qwen2.5-7b), HELM model name (meta/opt-30b) or checkpoint dir")
    p.add_argument("--suite", default="flexgen")
    p.add_argument("-m", "--max-eval-instances", type=int,
                   help="eval instances per entry (also caps an entry's own max_eval_instances)")
    p.add_argument("-o", "--output-path", default="benchmark_output")
    p.add_argument("--local-path", default="prod_env", help="HELM's prod_env (configs and request cache)")
    p.add_argument("-n", "--num-threads", type=int, default=4, help="HELM threads for scoring")
    p.add_argument("--verbose", action="store_true", help="show HELM's log on the console")
    p.add_argument("--no-progress", action="store_true")
    add_engine_args(p)
    from . import scaleout_cli
    scaleout_cli.add_args(p)
    p.set_defaults(func=_run)

    q = subparsers.add_parser("prod-env", help="write HELM prod_env configs for the flexgen deployments",
                              description="Write model_metadata/model_deployments/tokenizer_configs YAMLs "
                                          "(flexgen/NAME and flexgen/NAME-4bit for every OPT, Llama, Mistral, "
                                          "Qwen2.5 and Qwen3 size) into a HELM prod_env.")
    q.add_argument("--out", default="prod_env")
    q.add_argument("--weights-root", help="directory holding checkpoint directories named by public size "
                                                   "(opt-30b, llama-3.1-8b, ...)")
    q.add_argument("--checkpoint", action="append", metavar="NAME=DIR",
                   help="a checkpoint: opt-30b=/w/opt-30b repoints flexgen/opt-30b (any public size likewise); "
                        "other names add flexgen/NAME")
    q.add_argument("--tiny", action="store_true", help="also add the shipped demo model (flexgen/demo-model)")
    q.set_defaults(func=_prod_env)
