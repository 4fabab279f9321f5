"""The paper's setting on paper: `python -m flexgen_helm.policy.reproduce [--json out.json]`.

1. OPT-30B / OPT-175B, prompt 512, gen 32, one 16 GB T4 with 208 GB DRAM and 1.5 TB NVMe: the
   policy this search picks and its predicted throughput, next to FlexGen's published policy and
   measured throughput, and what this cost model predicts for FlexGen's policy in this engine.
2. FlexGen's 7 HELM sub-scenarios on OPT-IML-30B (same shapes as OPT-30B): predicted wall time per
   sub-scenario next to the times in `helm_passed_30b.sh` (21 hours in total).

Budgets follow FlexGen's cost model (15 GB usable of the T4, 200 GB DRAM, 1.5 TB disk). Profiles:
`t4-gcp` (FlexGen's fitted constants) and `t4-gcp-ssd` (the same with the disk at the paper's SSD
figures). Nothing here is fitted to the published throughputs.
"""
from __future__ import annotations

import argparse
import json

from ..engine.config import MemoryBudget, Policy
from ..engine.model_spec import spec_from_name
from .cost_model import estimate
from .profiler import load_profile
from .search import SubScenario, predict_benchmark, search

BUDGET = MemoryBudget(gpu=15 * 10**9, cpu=200 * 10**9, disk=1500 * 10**9)

# FlexGen bench_suite.py policies at s=512 and the paper's Table 2 throughputs (token/s)
PUBLISHED = [
    ("opt-30b", False, 7.32, Policy.from_percent([20, 80, 0, 100, 0, 100], gpu_batch_size=48, num_gpu_batches=3,
                                                cpu_cache_compute=True)),
    ("opt-30b", True, 8.38, Policy.from_percent([0, 100, 0, 100, 0, 100], gpu_batch_size=64, num_gpu_batches=8,
                                               compress_cache=True)),
    ("opt-175b", False, 0.69, Policy.from_percent([0, 50, 0, 0, 0, 100], gpu_batch_size=32, num_gpu_batches=8,
                                                 cpu_cache_compute=True, pin_weight=False)),
    ("opt-175b", True, 1.12, Policy.from_percent([0, 100, 0, 100, 0, 100], gpu_batch_size=48, num_gpu_batches=3,
                                                compress_weight=True, compress_cache=True)),
]

# helm_passed_30b.sh: (description, padded prompt, gen, eval instances, percent, gbs, ngb, minutes)
HELM_7 = [
    ("wikifact plaintiff", 256, 8, 96, [20, 80, 0, 100, 0, 100], 96, 3, 10),
    ("wikifact instance_of", 256, 8, 850, [20, 80, 0, 100, 0, 100], 96, 3, 55),
    ("mmlu abstract_algebra", 512, 1, 100, [20, 80, 0, 100, 0, 100], 48, 3, 31),
    ("mmlu us_foreign_policy", 512, 1, 100, [20, 80, 0, 100, 0, 100], 48, 3, 33),
    ("synthetic_reasoning pattern_match", 256, 50, 515, [20, 80, 0, 100, 0, 100], 36, 4, 118),
    ("synthetic_reasoning_natural easy", 512, 20, 515, [20, 80, 0, 100, 0, 100], 36, 4, 100),
    ("summarization_xsum_sampled", 1984, 64, 518, [0, 100, 0, 100, 0, 100], 8, 4, 902),
]
TRIALS = 3  # FlexGen's helm_run builds run specs with num_train_trials=3: three request sets per instance


def throughput_table(profiles: list[str]) -> list[dict]:
    rows = []
    for model, comp, published, fg_policy in PUBLISHED:
        spec = spec_from_name(model)
        for prof in profiles:
            hw = load_profile(prof)
            res = search(spec, prompt_len=512, gen_len=32, budget=BUDGET, hw=hw, dtype_bytes=2,
                         allow_compression=comp)
            ours = res.best.estimate
            fg = estimate(spec, fg_policy, hw, 512, 32, 2)
            rows.append({"model": model, "compression": comp, "profile": prof, "published": published,
                         "published_policy": fg_policy.to_dict(), "ours_policy": ours.policy.to_dict(),
                         "ours_pred": ours.throughput, "ours_prefill_s": ours.prefill_s,
                         "ours_decode_s": ours.decode_s, "ours_memory": ours.memory,
                         "ratio": ours.throughput / published, "flexgen_policy_pred": fg.throughput,
                         "flexgen_policy_memory": fg.memory,
                         "flexgen_policy_fits": all(fg.memory[t] <= getattr(BUDGET, t) for t in fg.memory)})
    return rows


def helm_table(profile: str, load_each: bool = True) -> dict:
    spec = spec_from_name("opt-30b")
    hw = load_profile(profile)
    load_s = spec.weight_bytes(2) / hw.disk_read_bw if load_each else 0.0  # FlexGen rebuilt OptLM per run entry
    fg_subs = [SubScenario(n, p, g, TRIALS * inst, Policy.from_percent(pc, gpu_batch_size=b, num_gpu_batches=k,
                                                                       cpu_cache_compute=True))
               for n, p, g, inst, pc, b, k, _ in HELM_7]
    auto_subs = [SubScenario(n, p, g, TRIALS * inst) for n, p, g, inst, *_ in HELM_7]
    fg_rows = predict_benchmark(spec, fg_subs, hw, BUDGET, 2, load_s_per_scenario=load_s)
    auto_rows = predict_benchmark(spec, auto_subs, hw, BUDGET, 2, load_s_per_scenario=load_s)
    rows = []
    for (n, p, g, inst, *_, minutes), fr, ar in zip(HELM_7, fg_rows, auto_rows):
        rows.append({"sub_scenario": n, "prompt_len": p, "gen_len": g, "instances": inst, "requests": TRIALS * inst,
                     "paper_min": minutes, "flexgen_policy_pred_min": fr["predicted_s"] / 60,
                     "ours_pred_min": ar["predicted_s"] / 60, "ours_policy": ar["policy"].to_dict(),
                     "ours_blocks": ar["blocks"]})
    return {"profile": profile, "model_load_min_each": load_s / 60, "rows": rows,
            "paper_total_h": sum(r["paper_min"] for r in rows) / 60,
            "flexgen_policy_pred_total_h": sum(r["flexgen_policy_pred_min"] for r in rows) / 60,
            "ours_pred_total_h": sum(r["ours_pred_min"] for r in rows) / 60}


def _pct(p: dict) -> str:
    return Policy.from_dict(p).describe()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t = throughput_table(["t4-gcp", "t4-gcp-ssd"])
    print("| model | 4-bit | profile | FlexGen policy | published tok/s | our policy | predicted tok/s | ratio |"
          " FlexGen policy predicted here |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in t:
        fits = "" if r["flexgen_policy_fits"] else " (over budget here)"
        print(f"| {r['model']} | {'yes' if r['compression'] else 'no'} | {r['profile']} | "
              f"{_pct(r['published_policy'])} | {r['published']} | {_pct(r['ours_policy'])} | "
              f"{r['ours_pred']:.2f} | {r['ratio']:.2f} | {r['flexgen_policy_pred']:.2f}{fits} |")
    h = helm_table("t4-gcp")
    print(f"\nHELM, OPT-IML-30B on T4 (profile {h['profile']}; {TRIALS} request sets per instance; "
          f"+{h['model_load_min_each']:.1f} min weight load per sub-scenario)")
    print("| sub-scenario | prompt+gen | requests | paper min | FlexGen policy predicted min | our policy |"
          " our predicted min |")
    print("|---|---|---|---|---|---|---|")
    for r in h["rows"]:
        print(f"| {r['sub_scenario']} | {r['prompt_len']}+{r['gen_len']} | {r['requests']} | {r['paper_min']} | "
              f"{r['flexgen_policy_pred_min']:.0f} | {_pct(r['ours_policy'])} | {r['ours_pred_min']:.0f} |")
    print(f"| total (hours) | | | {h['paper_total_h']:.1f} | {h['flexgen_policy_pred_total_h']:.1f} | | "
          f"{h['ours_pred_total_h']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"throughput": t, "helm": h}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
