"""Batch-1 decode speed of two checkouts of this project, alternating (these VMs' speed drifts by the
hour, so only side-by-side rounds compare): each round runs each checkout once per weight form in a
fresh process, on `dummy:` weights, everything on the compute tier.

    python scripts/ab_decode.py OLD_CHECKOUT NEW_CHECKOUT --model dummy:qwen3-0.6b --rounds 3

Prints per round and checkout the median decode ms per token over --repeat generations.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import statistics, sys, torch
from flexgen_helm.engine.config import Policy
from flexgen_helm.engine.engine import Engine
model, w4, repeat, plen = sys.argv[1], sys.argv[2] == "4bit", int(sys.argv[3]), int(sys.argv[4])
pol = Policy(gpu_batch_size=1, compress_weight=w4)
g = torch.Generator().manual_seed(0)
prompts = [[2] + torch.randint(4, 30000, (plen - 1,), generator=g).tolist()]
with Engine.from_pretrained(model, policy=pol, device="cpu", prompt_len=plen, gen_len=16) as eng:
    eng.generate(prompts, max_new_tokens=4)
    ts = [eng.generate(prompts, max_new_tokens=16).stats.decode_time / 15 * 1e3 for _ in range(repeat)]
print("%.1f" % statistics.median(ts))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs=2, help="two repository roots (e.g. a git worktree of the old commit)")
    ap.add_argument("--model", default="dummy:opt-1.3b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5, help="timed generations per process")
    ap.add_argument("--forms", default="4bit,16bit", help="weight forms to time, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (decode attends to them)")
    args = ap.parse_args()
    if args.prompt_len < 1:
        ap.error("--prompt-len must be at least 1")
    for r in range(1, args.rounds + 1):
        for form in args.forms.split(","):
            row = []
            for root in args.checkouts:
                env = {**os.environ, "PYTHONPATH": os.path.abspath(root)}
                out = subprocess.run([sys.executable, "-c", CHILD, args.model, form, str(args.repeat),
                                      str(args.prompt_len)], env=env,
                                     capture_output=True, text=True, check=True).stdout.split()[-1]
                row.append(f"{os.path.basename(os.path.abspath(root))} {out}")
            print(f"round {r} {args.model} {form}: " + " vs ".join(row) + " ms per token", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
