"""`flexgen-helm bench` under torchrun: every rank runs its pipeline stage; rank 0 writes the JSON
(throughputs as in the single-process bench, plus each stage's busy / waiting time and the
timeline of one decode step)."""
from __future__ import annotations

import json
import os

import torch

from ..engine.config import ConfigError, MemoryBudget, Policy, default_dtype, dtype_name, parse_bytes


def _stage_policy(args, rank: int) -> tuple[Policy, list[int] | None, int | None]:
    """This rank's policy: --percent flags, a Policy JSON, or the JSON `flexgen-helm policy --stages N
    --json` writes (its stage `rank`, split and groups)."""
    from ..bench import _policy
    if args.policy == "auto":
        raise ConfigError("--policy auto is not per stage: run `flexgen-helm policy --stages N --json plan.json` "
                          "and pass --policy plan.json")
    if args.policy:
        with open(args.policy) as f:
            d = json.load(f)
        if "stages" in d:
            from .engine import stage_plan
            return stage_plan(args.policy, rank)
    return _policy(args), None, None


def main_distributed(args) -> int:
    from ..bench import _prompts, _summary
    from ..engine.engine import Engine
    rank = int(os.environ.get("RANK", "0"))
    device = args.device
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    dtype = getattr(torch, dtype_name(args.dtype) if args.dtype else default_dtype(device))
    budget = MemoryBudget(parse_bytes(args.gpu_mem), parse_bytes(args.cpu_mem), parse_bytes(args.disk_mem))
    if device.startswith("cuda") and budget.gpu and torch.cuda.is_available():
        dev = torch.device(device)
        torch.cuda.set_per_process_memory_fraction(budget.gpu / torch.cuda.get_device_properties(dev).total_memory, dev)
    policy, bounds, groups = _stage_policy(args, rank)
    bounds = [int(x) for x in args.stages.split(",")] if args.stages else bounds
    groups = args.pipeline_groups or groups
    eng = Engine.from_pretrained(args.model, policy=policy, device=device, dtype=dtype,
                                 offload_dir=args.offload_dir or os.getcwd(), budget=budget, prompt_len=args.prompt_len,
                                 gen_len=args.gen_len, distributed=True, stages=bounds, pipeline_groups=groups)
    try:
        n = policy.block_size * eng.groups
        prompts = _prompts(n, args.prompt_len, eng.spec.vocab_size)
        eng.generate(prompts[:policy.gpu_batch_size], max_new_tokens=2)  # warm-up
        runs, last = [], None
        for _ in range(args.repeat):
            last = eng.generate(prompts, max_new_tokens=args.gen_len)
            if rank == 0:
                runs.append({"prefill_s": last.stats.prefill_time, "decode_s": last.stats.decode_time,
                             "io_wait_s": last.stats.io_wait_time})
        if rank != 0:
            return 0
        step = max(1, args.gen_len // 2)
        stages = []
        for st in last.stats.stages:
            tot = st["totals"]
            wall = tot["busy_s"] + tot["wait_s"] + tot["send_s"]
            stages.append({**{k: st[k] for k in ("stage", "layers", "policy", "io_wait_s", "bytes_moved",
                                                  "peak_memory_bytes")},
                           "cpu_s": st["cpu_s"], "wall_s": st["wall_s"], "busy_s": tot["busy_s"],
                           "wait_s": tot["wait_s"], "send_s": tot["send_s"],
                           "busy_fraction": tot["busy_s"] / wall if wall else None,
                           "decode_step_timeline": [u for u in st["units"] if u["step"] == step]})
        out = {"system": "flexgen-helm pipeline", "model": args.model, "prompt_len": args.prompt_len,
               "gen_len": args.gen_len, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
               "torch_threads": torch.get_num_threads(), "world_size": eng.world,
               "stage_bounds": list(eng.split.bounds),
               "pipeline_groups": eng.groups, "num_prompts": n, **_summary(runs, n, args.prompt_len, args.gen_len),
               "timeline_step": step, "stages": stages, "bytes_moved": last.stats.bytes_moved,
               "peak_memory_bytes": last.stats.peak_memory_bytes}
        text = json.dumps(out, indent=2)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text)
        keys = ("system", "model", "world_size", "stage_bounds", "generation_throughput", "prefill_throughput",
                "decode_throughput")
        print(json.dumps({k: out[k] for k in keys}, indent=2))
        for s in stages:
            print(f"stage {s['stage']} layers {s['layers']}: busy {s['busy_s']:.2f} s, waiting {s['wait_s']:.2f} s, "
                  f"sending {s['send_s']:.2f} s; process CPU {s['cpu_s']:.2f} s in {s['wall_s']:.2f} s")
        return 0
    finally:
        eng.close()
