"""`flexgen-helm profile` (measure this machine) and `flexgen-helm policy` (search a policy)."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    if "profile" not in subparsers.choices:
        p = subparsers.add_parser("profile", help="measure copy/disk/matmul/attention speeds of this machine",
                                  description=_cmd_profile.__doc__)
        p.add_argument("--device", default="cpu", help="compute device: cpu or cuda[:i] (default cpu)")
        p.add_argument("--dtype", default=None, help="compute dtype, bf16 | fp16 | fp32 (default: fp16 on cuda; on cpu bf16 with AVX512-BF16/AMX, else fp32)")
        p.add_argument("--offload-dir", default=None,
                       help="directory on the disk the engine will offload to (default: the temp dir)")
        p.add_argument("--seconds", type=float, default=20.0, help="rough time budget for all probes (default 20)")
        p.add_argument("--json", default=None, help="write the profile here (it is also cached for later runs)")
        p.set_defaults(func=_cmd_profile)
    if "policy" not in subparsers.choices:
        p = subparsers.add_parser("policy", help="search the offloading policy for a model, workload and memory",
                                  description=_cmd_policy.__doc__)
        p.add_argument("--model", required=True,
                       help="a public size (opt-30b, llama-3.1-70b, mistral-7b, qwen2.5-72b, qwen3-8b, ...), "
                            "a hub id (meta-llama/Llama-3.1-8B), dummy:NAME or a checkpoint dir")
        p.add_argument("--gpu-mem", required=True, help="budget of the compute tier, e.g. 16GB")
        p.add_argument("--cpu-mem", default=None, help="host memory budget, e.g. 200GB (default: unlimited)")
        p.add_argument("--disk-mem", default=None, help="disk budget, e.g. 1.5TB (default: unlimited; 0 = no disk)")
        p.add_argument("--prompt-len", type=int, default=512)
        p.add_argument("--gen-len", type=int, default=32)
        p.add_argument("--num-prompts", type=int, default=None,
                       help="prompts in the workload: caps the block size and counts the last partial block")
        p.add_argument("--profile", default=None,
                       help="hardware profile JSON or a shipped name (t4-gcp, t4-gcp-ssd); default: this machine, "
                            "measured once and cached")
        p.add_argument("--device", default=None, help="device of the measured profile when --profile is not given")
        p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per element of the compute dtype (2)")
        p.add_argument("--allow-compression", action="store_true", help="also consider 4-bit weights / KV cache")
        p.add_argument("--top", type=int, default=0, help="also list the N next-best candidates")
        p.add_argument("--stages", type=int, default=1,
                       help="pipeline stages (one per GPU or host, run with torchrun): prints the split and each "
                            "stage's policy; the budgets are per stage")
        p.add_argument("--json", default=None, help="write the result here")
        p.set_defaults(func=_cmd_policy)


def _cmd_profile(args) -> int:
    """Measure host<->compute copies, disk read/write (page cache bypassed), matmul, attention and
    dequantization speeds, and cache the profile for the policy search."""
    from ..engine.config import default_dtype, dtype_name
    from .profiler import cache_path, measure_profile
    device = args.device.split(":")[0]
    dtype = dtype_name(args.dtype) if args.dtype else default_dtype(device)
    prof = measure_profile(device=args.device, dtype=dtype, offload_dir=args.offload_dir,
                           budget_s=args.seconds, log=print)
    path = cache_path(device, dtype)
    prof.to_json(path)
    print(f"cached at {path}")
    if args.json:
        prof.to_json(args.json)
        print(f"wrote {args.json}")
    return 0


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def _cmd_policy(args) -> int:
    """Search the policy (batch shape, placement of weights / KV cache / activations over the
    gpu, cpu and disk tiers, CPU attention, compression) with the highest predicted throughput."""
    from ..engine.config import MemoryBudget, parse_bytes
    from ..engine.model_spec import load_spec
    from .profiler import load_or_measure, load_profile, profile_dtype
    from .search import search

    spec = load_spec(args.model)
    budget = MemoryBudget(parse_bytes(args.gpu_mem), parse_bytes(args.cpu_mem), parse_bytes(args.disk_mem))
    if args.profile:
        hw = load_profile(args.profile)
    else:
        device = (args.device or "cpu").split(":")[0]
        hw = load_or_measure(device, profile_dtype(device, args.dtype_bytes), log=print, spec=spec)
    if args.stages > 1:
        return _print_pipeline(args, spec, budget, hw)
    res = search(spec, prompt_len=args.prompt_len, gen_len=args.gen_len, budget=budget, hw=hw,
                 dtype_bytes=args.dtype_bytes, num_prompts=args.num_prompts,
                 allow_compression=args.allow_compression, use_machine_memory=args.profile is None)
    est = res.best.estimate
    print(f"{spec.name}, prompt {args.prompt_len} + gen {args.gen_len}, profile {hw.name}, "
          f"budgets gpu={args.gpu_mem} cpu={args.cpu_mem or 'unlimited'} disk={args.disk_mem or 'unlimited'}")
    print(f"policy: {est.policy.describe()}   (batch x micro-batches, gpu/cpu/disk % of weights, KV cache, "
          "activations)")
    print(f"predicted: generation {est.throughput:.3f} tok/s (gen tokens / (prefill + decode)), "
          f"prefill {est.prefill_throughput:.1f} tok/s, decode {est.decode_throughput:.3f} tok/s")
    print(f"  one block: prefill {est.prefill_s:.1f} s + decode {est.decode_s:.1f} s = {est.block_s:.1f} s")
    if args.num_prompts:
        print(f"  {args.num_prompts} prompts: {res.best.total_s:.1f} s")
    print("memory at peak: " + ", ".join(f"{t} {_gb(v)}" for t, v in est.memory.items()))
    print(f"({len(res.candidates)} candidates from {res.lps_solved} LPs)")
    for c in res.candidates[1:1 + args.top]:
        e = c.estimate
        print(f"  alt {e.throughput:.3f} tok/s: {e.policy.describe()}")
    if args.json:
        out = est.to_dict()
        out.update({"model": spec.name, "profile": hw.name, "total_s": res.best.total_s,
                    "budget": {"gpu": budget.gpu, "cpu": budget.cpu, "disk": budget.disk}})
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


def _print_pipeline(args, spec, budget, hw) -> int:
    from .pipeline import describe, plan_pipeline
    plan = plan_pipeline(spec, args.stages, prompt_len=args.prompt_len, gen_len=args.gen_len, budget=budget, hw=hw,
                         dtype_bytes=args.dtype_bytes, allow_compression=args.allow_compression)
    print(f"{spec.name}, prompt {args.prompt_len} + gen {args.gen_len}, profile {hw.name}, budgets per stage "
          f"gpu={args.gpu_mem} cpu={args.cpu_mem or 'unlimited'} disk={args.disk_mem or 'unlimited'}")
    print("\n".join(describe(plan)))
    if args.json:
        out = plan.to_dict()
        out.update({"model": spec.name, "profile": hw.name})
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:  # `python -m flexgen_helm.policy.cli policy ...`
    parser = argparse.ArgumentParser(prog="flexgen-helm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
