"""`flexgen-helm` command line: parse arguments, call one library function, print.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`, which adds its
parser and sets `func`; modules are imported here so `--help` lists them all.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that registers it (kept light at import time: heavy imports happen in func)
_COMMANDS = {
    "bench": "flexgen_helm.bench",
    "demo": "flexgen_helm.demo",
    "accuracy": "flexgen_helm.accuracy",
    "profile": "flexgen_helm.policy.cli",
    "policy": "flexgen_helm.policy.cli",
    "run": "flexgen_helm.helm.cli",
    "prod-env": "flexgen_helm.helm.cli",
    "merge-cache": "flexgen_helm.helm.scaleout_cli",
    "report": "flexgen_helm.report.cli",
    "train-demo": "flexgen_helm.train_demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexgen-helm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(_COMMANDS.values()):
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .engine.config import ConfigError
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # bad input: one clear line, no traceback
        print(f"flexgen-helm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
