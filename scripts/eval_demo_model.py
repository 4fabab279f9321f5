"""Score demo-model checkpoints side by side: greedy answers through the engine, HELM's metric,
and the trivial baselines on the same prompts.

Samples: "test" is HELM's own test split (seed 42: what the demo evaluates; report it, never pick a
checkpoint by it); "val" is HELM's generator under seed 7 (train_demo.VAL_SEED) minus HELM's eval
splits, for choosing between checkpoints. Shots are the first in-context examples of HELM's train
split, as HELM's adapter picks them for the demo.

    python scripts/eval_demo_model.py --model flexgen_helm/data/demo-model --model st8 --sample val \
        --tasks pattern_match,srn_easy --n 96 --json val.json
"""
from __future__ import annotations

import argparse
import json
import time

from flexgen_helm.demo_tasks import TASKS, baselines, generate_examples, helm_split, num_shots
from flexgen_helm.train_demo import VAL_SEED, engine_generate, evaluate


def queries(task: str, sample: str, n: int, skip: int):
    pool = helm_split(task, "test") if sample == "test" else generate_examples(task, [VAL_SEED])
    return list(pool)[skip:skip + n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="checkpoint directory (repeat to compare)")
    ap.add_argument("--sample", choices=("val", "test"), default="val")
    ap.add_argument("--tasks", default="pattern_match,srn_easy", help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--n", type=int, default=96, help="prompts per task")
    ap.add_argument("--skip", type=int, default=0, help="start this far into the sample")
    ap.add_argument("--json", help="write the scores here")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    out: dict = {"sample": args.sample, "n": args.n, "skip": args.skip, "scores": {}}
    samples = {t: queries(t, args.sample, args.n, args.skip) for t in tasks}
    for t in tasks:
        base = baselines(t, list(helm_split(TASKS[t].held_out_from, "train")), samples[t])
        out["scores"].setdefault(t, {}).update(base)
        print(f"{t}: {len(samples[t])} prompts; most frequent answer {base['most_frequent']:.3f}, "
              f"copy last {base['copy_last']:.3f}", flush=True)
    for model in args.model:
        gen, close = engine_generate(model)
        try:
            for t in tasks:
                shots = list(helm_split(TASKS[t].held_out_from, "train"))[:num_shots(t)]
                t0 = time.time()
                s = evaluate(gen, t, shots, samples[t])
                out["scores"][t][model] = s
                print(f"{t}: {model} {s:.3f} ({time.time() - t0:.0f} s)", flush=True)
        finally:
            close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
