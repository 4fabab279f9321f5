"""`flexgen-helm demo`: the whole pipeline offline on the shipped demo model.

Points a prod_env at the packaged demo model (a small Llama trained by `flexgen-helm train-demo`
on HELM's synthetic-reasoning generators), places the stand-in data, runs run_specs.conf with
`flexgen-helm run`, then `helm-summarize`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from importlib import resources

DEMO_CONF = "run_specs.conf"


def _conf_path(conf: str | None) -> str:
    if conf:
        return conf
    if os.path.exists(DEMO_CONF):
        return DEMO_CONF
    # installed without the repo: the same conf ships with the package
    return str(resources.files("flexgen_helm.helm").joinpath("data", DEMO_CONF))


def summarize(output_path: str, suite: str, local_path: str) -> None:
    """Stock helm-summarize, as its own process (it parses sys.argv and sets up its own logging).
    One thread: its threads compile mako templates at once, and CPython 3.11's AST constructor can
    then fail at random ("SystemError: AST constructor recursion depth mismatch", python/cpython
    gh-106905; seen once in a fresh-clone `make demo` here). Seven runs summarize in about a second."""
    cmd = [sys.executable, "-c", "from helm.benchmark.presentation.summarize import main; main()",
           "--suite", suite, "-o", output_path, "--local-path", local_path, "--num-threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        from .engine.config import ConfigError
        raise ConfigError(f"helm-summarize failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def _demo(args: argparse.Namespace) -> int:
    from .helm.batch_run import RunOptions, print_summary, run
    from .helm.prod_env import add_checkpoint
    from .helm.standins import place_standins
    from .tiny import DEMO_MODEL, demo_model_dir

    t0 = time.time()
    out, local = args.output_path, os.path.join(args.output_path, "prod_env")
    print("1/4 demo model ...", flush=True)
    model_dir = demo_model_dir()
    deployment = add_checkpoint(local, model_dir, name=DEMO_MODEL, client_args={"dtype": args.dtype})
    print(f"    {model_dir} -> deployment {deployment} in {local}/")
    print("2/4 offline stand-in data ...", flush=True)
    for name, status in place_standins(out).items():
        print(f"    {name}: {status}")
    print(f"3/4 flexgen-helm run on {_conf_path(args.conf)} (-m {args.max_eval_instances}) ...", flush=True)
    opts = RunOptions(conf=[_conf_path(args.conf)], model=deployment, suite=args.suite,
                      max_eval_instances=args.max_eval_instances, output_path=out, local_path=local,
                      engine={"gpu_batch_size": args.gpu_batch_size}, progress=not args.no_progress)
    summary = run(opts)
    print_summary(summary, out, args.suite)
    print("4/4 helm-summarize ...", flush=True)
    summarize(out, args.suite, local)
    print(f"done in {time.time() - t0:.0f} s. Outputs:")
    print(f"    runs + summary tables: {summary.suite_path}/ (groups/*.json, summary.json)")
    print(f"    timing log:            {summary.timing_log}")
    print(f"    request cache:         {local}/cache/")
    print(f"    browse:                helm-server --suite {args.suite} -o {out}")
    return 1 if summary.failures or summary.request_errors else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="offline end-to-end demo on the shipped demo model",
                              description=__doc__.splitlines()[0])
    p.add_argument("-m", "--max-eval-instances", type=int, default=8)
    p.add_argument("--conf", help="run-entries conf (default: ./run_specs.conf, else the packaged copy)")
    p.add_argument("-o", "--output-path", default="demo_output")
    p.add_argument("--suite", default="demo")
    p.add_argument("--gpu-batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", help="engine compute dtype for the demo model (trained in fp32)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)
