"""Check the policy search against the engine on this machine:
`python -m flexgen_helm.policy.validate [--json out.json] [--profile hw.json] [--threads 1]`.

For each workload (model, prompt/gen length, number of prompts, memory budgets that force host and
disk placement) it searches a policy with this machine's measured profile, then runs the engine
with that policy and with 5 other feasible policies, and reports predicted vs measured generation
throughput (generated tokens / (prefill + decode) over the whole workload) and peak memory per tier.

The alternatives are the search's own runners-up with a different batch shape or placement,
spread over its ranking, skipping those predicted within 10% of the chosen one (a tie the model
cannot resolve), plus a hand policy ("everything in host memory").

Noise: this is usually run on small shared machines. Torch is pinned to `--threads` (default 1:
with two cores and another busy process, every multi-threaded op waits a scheduler slice at its
barrier, which makes both the profile and the runs meaningless), each measured figure is the best
of `--repeat` runs taken round-robin over the policies (a slow minute of a neighbour then costs one
run of several policies, not all runs of one), and the load average is recorded next to each run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable

from ..engine.config import ConfigError, MemoryBudget, Policy, default_dtype, dtype_name, parse_bytes
from ..engine.model_spec import load_spec
from .cost_model import estimate
from .profiler import HardwareProfile, disk_read_probe, measure_profile, refresh_io, with_disk_rate, with_widths
from .search import Candidate, host_available, confirm, effective_budget, search, workload_time


@dataclass(frozen=True)
class Workload:
    name: str
    model: str
    prompt_len: int
    gen_len: int
    num_prompts: int
    gpu: str
    cpu: str
    disk: str
    scale: float = 1.0  # budgets are sized for 2-byte weights; fp32 runs scale them by 2

    @property
    def budget(self) -> MemoryBudget:
        return MemoryBudget(*(int(parse_bytes(b) * self.scale) for b in (self.gpu, self.cpu, self.disk)))


# Small enough for a few minutes on two cores; the budgets push weights and/or cache to host and disk.
# (The compute tier must hold two staging copies of the largest layer, the embedding: 160 MB for
# 125m, 110 MB for 350m, 430 MB for 1.3b.)
WORKLOADS = [
    Workload("125m host", "dummy:opt-125m", 128, 16, 32, "200MB", "2GB", "0"),
    Workload("125m disk", "dummy:opt-125m", 64, 16, 32, "200MB", "100MB", "2GB"),
    Workload("350m host", "dummy:opt-350m", 128, 16, 24, "250MB", "2GB", "0"),
    Workload("350m cache", "dummy:opt-350m", 256, 8, 32, "300MB", "700MB", "4GB"),
    Workload("1.3b disk", "dummy:opt-1.3b", 32, 8, 8, "600MB", "1.5GB", "8GB"),
]


def _fits(mem: dict[str, int], budget: MemoryBudget) -> bool:
    return all(getattr(budget, t) is None or mem[t] <= getattr(budget, t) for t in ("gpu", "cpu", "disk"))


def pick_alternatives(chosen: Candidate, cands: list[Candidate], spec, hw: HardwareProfile, w: Workload,
                      n: int = 5, tie: float = 1.10, dtype_bytes: int = 2) -> list[Candidate]:
    """n feasible policies other than the chosen one, spread over the search's ranking."""
    def key(p: Policy) -> tuple:
        # attends_on_host, not cpu_cache_compute: validate run 16 timed two policies that differed
        # only in the flag, with the whole cache on the compute tier, as two alternatives
        return (p.gpu_batch_size, p.num_gpu_batches, p.attends_on_host, round(p.w_gpu_percent / 10),
                round(p.w_cpu_percent / 10), round(p.cache_gpu_percent / 10), round(p.cache_cpu_percent / 10))

    seen = {key(chosen.estimate.policy)}
    pool = []
    limits, base = effective_budget(w.budget, hw.device, False), Policy(pin_weight=hw.device == "cuda")
    for c in sorted(cands, key=lambda c: c.per_token_s):
        k = key(c.estimate.policy)
        if k in seen or c.per_token_s < chosen.per_token_s * tie:
            continue
        # candidates were screened with the LP's linear memory mirror: confirm with the engine's plan
        # (re-planned when at a budget's edge, as the search does for its choice)
        fit, _ = confirm(spec, hw, c, limits, w.prompt_len, w.gen_len, dtype_bytes, w.num_prompts, base)
        if fit is None or fit.per_token_s < chosen.per_token_s * tie:
            continue
        seen.add(k)
        pool.append(fit)
    # a hand policy: the chosen batch shape, weights and cache in host memory, attention on the host
    p0 = chosen.estimate.policy
    hand = replace(p0, w_gpu_percent=0.0, w_cpu_percent=100.0, cache_gpu_percent=0.0, cache_cpu_percent=100.0,
                   cpu_cache_compute=True)
    picks: list[Candidate] = []
    e = estimate(spec, hand, hw, w.prompt_len, w.gen_len, dtype_bytes)
    if _fits(e.memory, w.budget) and key(hand) not in seen and \
            workload_time(e, spec, hw, w.num_prompts, dtype_bytes) >= chosen.total_s * tie:
        t = workload_time(e, spec, hw, w.num_prompts, dtype_bytes)
        picks.append(Candidate(e, t, t / (w.num_prompts * w.gen_len)))
    need = n - len(picks)
    if pool and need > 0:
        step = max(1, len(pool) // need)
        idx = list(range(0, len(pool), step))[:need]
        picks += [pool[i] for i in idx]
    return picks[:n]


def busy_fraction(window: float = 1.0) -> float:
    """Share of all CPUs busy over `window` seconds (this process idles meanwhile): other load."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    t0, i0 = read()
    time.sleep(window)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(threshold: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use less than `threshold` of the CPUs; the
    busy share last seen is returned and recorded next to the run."""
    deadline = time.time() + max_wait
    busy = busy_fraction()
    while busy > threshold and time.time() < deadline:
        busy = busy_fraction(2.0)
    return busy


def engines_fit_together(need: list[int], available: int) -> bool:
    """Whether engines that each hold need[i] bytes of host memory can stay built at once, in 80% of
    what is available (validate run 11 was OOM-killed building six opt-1.3b fp32 engines on 24 GB)."""
    return sum(need) <= 0.8 * available


def host_bytes(w: Workload, memory: dict[str, int] | None = None) -> int:
    """Host memory one engine holds on a CPU compute device, where the gpu tier is host memory too:
    its memory plan's gpu + cpu bytes, or without a plan the workload's budgets (an upper bound)."""
    m = memory if memory is not None else {"gpu": w.budget.gpu or 0, "cpu": w.budget.cpu or 0}
    return m["gpu"] + m["cpu"]


def run_policies(w: Workload, pols: list[Policy], prompts: list[list[int]], offload_dir: str, repeat: int,
                 quiet: float = 1.0, max_wait: float = 0.0, log=print,
                 dtype: str = "bfloat16", available: int | None = None,
                 memory: list[dict[str, int]] | None = None,
                 disk_rate: Callable[[], float] | None = None) -> list[dict | ConfigError]:
    """Time each policy `repeat` times, round-robin: every round runs each policy once. On a shared
    machine the disk and the cores slow down for a minute at a time; round-robin spreads each
    policy's runs over the whole measurement, so a slow minute costs one run of several policies
    instead of every run of one. The best run of each policy counts. The engines are built once and
    kept when they fit in host memory together (each policy's planned `memory` per tier, else the
    workload's budgets), else each run builds and closes its own. With `disk_rate` (a probe, B/s),
    the disk's read rate is measured right before and right after each run; the run records their
    mean."""
    import torch

    from ..engine.engine import Engine
    available = host_available() if available is None else available  # None: not Linux, keep them built
    need = [host_bytes(w, m) for m in (memory or [None] * len(pols))]
    together = available is None or engines_fit_together(need, available)
    if not together:
        log(f"[{w.name}] {len(pols)} engines' host memory ({sum(need) / 1e9:.1f} GB) exceeds 80% of what is "
            f"free ({available / 1e9:.1f} GB): each run builds its engine")

    def build(pol: Policy, stack: contextlib.ExitStack):
        t0 = time.perf_counter()
        eng = stack.enter_context(Engine.from_pretrained(
            w.model, policy=pol, device="cpu", dtype=getattr(torch, dtype), offload_dir=offload_dir,
            budget=w.budget, prompt_len=w.prompt_len, gen_len=w.gen_len))
        eng.generate(prompts[:pol.gpu_batch_size], max_new_tokens=2)  # warm-up: allocator, kernels, files
        return eng, time.perf_counter() - t0

    engines: list = []  # per policy: ConfigError, or [engine or None, build seconds, runs, peaks]
    with contextlib.ExitStack() as kept:
        for pol in pols:
            try:
                with contextlib.ExitStack() as own:
                    eng, build_s = build(pol, own)
                    if together:
                        kept.enter_context(own.pop_all())
                    engines.append([eng if together else None, build_s, [], {"gpu": 0, "cpu": 0, "disk": 0}])
                eng = None  # a closed engine's buffers go before the next one is built
            except ConfigError as e:  # reported, not fatal: the table shows what could not run
                engines.append(e)
        for r in range(repeat):
            for pol, e in zip(pols, engines):
                if isinstance(e, ConfigError):
                    continue
                with contextlib.ExitStack() as own:
                    eng = e[0] if together else build(pol, own)[0]
                    _, _, runs, peak = e
                    busy = wait_quiet(quiet, max_wait) if max_wait > 0 else busy_fraction(0.2)
                    before = disk_rate() if disk_rate else None
                    st = eng.generate(prompts, max_new_tokens=w.gen_len).stats
                    after = disk_rate() if disk_rate else None
                eng = None
                runs.append({"round": r, "prefill_s": st.prefill_time, "decode_s": st.decode_time,
                             "io_wait_s": st.io_wait_time, "busy_before": busy, "load": os.getloadavg()[0],
                             **({"disk_read_bw": (before + after) / 2} if disk_rate else {})})
                for t in peak:
                    peak[t] = max(peak[t], st.peak_memory_bytes.get(t, 0))
            log(f"[{w.name}] round {r + 1}/{repeat} done")
    out: list[dict | ConfigError] = []
    for e in engines:
        if isinstance(e, ConfigError):
            out.append(e)
            continue
        _, build_s, runs, peak = e
        best = min(runs, key=lambda r: r["prefill_s"] + r["decode_s"])
        total = best["prefill_s"] + best["decode_s"]
        out.append({"build_s": build_s, "runs": runs, "best_run": runs.index(best), "prefill_s": best["prefill_s"],
                    "decode_s": best["decode_s"], "total_s": total, "throughput": w.num_prompts * w.gen_len / total,
                    "peak_memory": peak})
    return out


def at_run_disk_rate(spec, pol: Policy, hw: HardwareProfile, w: Workload, dtype_bytes: int, pred_s: float,
                     measured: dict) -> dict:
    """Each run's prediction again at the disk read rate measured around it (run_policies'
    disk_rate), and the best run's meas/pred at its rate: separates the cost model's error from the
    disk's drift between the profile and the run. The chosen prediction `pred_s` is scaled by the
    model's own time at the two rates, so a candidate re-planned by the search keeps its figure."""
    def model_s(h: HardwareProfile) -> float:
        return workload_time(estimate(spec, pol, h, w.prompt_len, w.gen_len, dtype_bytes), spec, h,
                             w.num_prompts, dtype_bytes)
    at_profile = model_s(hw)
    for r in measured["runs"]:
        r["pred_s_at_disk"] = pred_s * model_s(with_disk_rate(hw, r["disk_read_bw"])) / at_profile
    best = measured["runs"][measured["best_run"]]
    return {"disk_read_bw_run": best["disk_read_bw"], "pred_s_run_disk": best["pred_s_at_disk"],
            "ratio_run_disk": best["pred_s_at_disk"] / measured["total_s"]}


def validate(workloads: list[Workload], hw: HardwareProfile | None, offload_dir: str, repeat: int = 2,
             n_alt: int = 5, quiet: float = 1.0, max_wait: float = 0.0, refresh: str = "full",
             log=print, dtype: str = "bfloat16") -> list[dict]:
    import torch
    dtype_bytes = getattr(torch, dtype).itemsize
    out = []
    for w in workloads:
        spec = load_spec(w.model)
        # Rates drift on shared machines (neighbours' CPU and disk use): measure again right before
        # predicting, in the conditions the runs will see. "io": copies and disk only (seconds).
        if refresh != "none" and max_wait > 0:
            wait_quiet(quiet, max_wait)
        if refresh == "full" or hw is None:
            hw = measure_profile("cpu", dtype, offload_dir=offload_dir, budget_s=12, widths=(),
                                 specs=(spec,))
        elif refresh == "io":
            hw = refresh_io(hw, offload_dir)
        hw = with_widths(hw, spec)
        res = search(spec, prompt_len=w.prompt_len, gen_len=w.gen_len, budget=w.budget, hw=hw,
                     dtype_bytes=dtype_bytes,
                     num_prompts=w.num_prompts)
        alts = pick_alternatives(res.best, res.candidates, spec, hw, w, n_alt,
                                 dtype_bytes=dtype_bytes)
        g = torch.Generator().manual_seed(0)
        prompts = [[2] + torch.randint(4, spec.vocab_size, (w.prompt_len - 1,), generator=g).tolist()
                   for _ in range(w.num_prompts)]
        rows = []
        picks = [("chosen", res.best)] + [("alternative", a) for a in alts]
        with contextlib.ExitStack() as stack:  # disk workloads: the disk rate around each run too
            probe = stack.enter_context(disk_read_probe(offload_dir)) if w.budget.disk else None
            measured = run_policies(w, [c.estimate.policy for _, c in picks], prompts, offload_dir, repeat, quiet,
                                    max_wait, log, dtype=dtype, memory=[c.estimate.memory for _, c in picks],
                                    disk_rate=probe)
        for (role, c), m in zip(picks, measured):
            pol = c.estimate.policy
            if isinstance(m, ConfigError):
                log(f"[{w.name}] {role:11s} {pol.describe():44s} could not run: {m}")
                continue
            pred_tput = w.num_prompts * w.gen_len / c.total_s
            row = {"role": role, "policy": pol.to_dict(), "pred_s": c.total_s, "pred_throughput": pred_tput,
                   "pred_memory": c.estimate.memory, **m, "ratio": m["throughput"] / pred_tput,
                   "within_budget": _fits(m["peak_memory"], w.budget)}
            if probe:
                row.update(at_run_disk_rate(spec, pol, hw, w, dtype_bytes, c.total_s, m))
            rows.append(row)
            at_run = f" (x{row['ratio_run_disk']:.2f} at the run's disk rate)" if probe else ""
            log(f"[{w.name}] {role:11s} {pol.describe():44s} pred {pred_tput:7.2f} tok/s  meas {m['throughput']:7.2f} "
                f"(x{row['ratio']:.2f}){at_run}  other load {max(r['busy_before'] for r in m['runs']):.0%}  "
                f"peak ok={row['within_budget']}")
        chosen = rows[0]
        out.append({"workload": w.__dict__, "rows": rows, "profile": hw.to_dict(), "chosen_pred": chosen["pred_throughput"],
                    "chosen_meas": chosen["throughput"], "ratio": chosen["ratio"],
                    "ratio_run_disk": chosen.get("ratio_run_disk"),
                    "chosen_is_fastest": all(chosen["throughput"] >= r["throughput"] for r in rows[1:]),
                    "lps": res.lps_solved})
    return out


def table(results: list[dict]) -> str:
    lines = ["| workload | budgets gpu/cpu/disk | chosen policy | predicted tok/s | measured tok/s | meas/pred |"
             " alternatives measured tok/s (predicted) | chosen fastest | meas/pred at the run's disk rate:"
             " chosen; alternatives (disk GB/s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        w = r["workload"]
        alts = ", ".join(f"{a['throughput']:.2f} ({a['pred_throughput']:.2f})" for a in r["rows"][1:])
        chosen = r["rows"][0]
        at_run = "-" if "ratio_run_disk" not in chosen else (
            f"{chosen['ratio_run_disk']:.2f} ({chosen['disk_read_bw_run'] / 1e9:.2f}); "
            + ", ".join(f"{a['ratio_run_disk']:.2f} ({a['disk_read_bw_run'] / 1e9:.2f})" for a in r["rows"][1:]))
        lines.append(f"| {w['name']}: {w['model'][6:]} {w['prompt_len']}+{w['gen_len']} x{w['num_prompts']} | "
                     f"{w['gpu']}/{w['cpu']}/{w['disk']} | {Policy.from_dict(chosen['policy']).describe()} | "
                     f"{r['chosen_pred']:.2f} | {r['chosen_meas']:.2f} | {r['ratio']:.2f} | {alts} | "
                     f"{'yes' if r['chosen_is_fastest'] else 'no'} | {at_run} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, help="profile JSON to use instead of measuring one now")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the profile and the runs (1)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per policy; the best counts (2)")
    ap.add_argument("--offload-dir", default=None, help="disk tier directory (default: a temp dir)")
    ap.add_argument("--only", default=None, help="comma-separated workload names to run")
    ap.add_argument("--dtype", default=None, help="compute dtype, bf16 | fp32 (default: the engine's for this CPU, "
                    "engine.config.default_dtype)")
    ap.add_argument("--max-wait", type=float, default=0.0,
                    help="before each timed run (and the profile), wait up to this many seconds for other "
                         "processes to use less than --quiet of the CPUs (shared machines)")
    ap.add_argument("--quiet", type=float, default=0.15)
    ap.add_argument("--refresh", choices=["full", "io", "none"], default="none",
                    help="with --profile: re-measure all of it before each workload, only its copy/disk "
                         "rates, or nothing (default). Without --profile a full profile is measured "
                         "before each workload.")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    try:
        dtype = dtype_name(args.dtype) if args.dtype else default_dtype("cpu")
    except ConfigError as e:  # before any measuring: one clear line
        ap.error(str(e))
    workloads = [replace(w, scale=getattr(torch, dtype).itemsize / 2) for w in workloads]
    with tempfile.TemporaryDirectory(prefix="flexgen-validate-", dir=args.offload_dir) as tmp:
        # without --profile, each workload gets a profile measured right before it (see validate)
        hw = HardwareProfile.from_json(args.profile) if args.profile else None
        refresh = args.refresh if args.profile else "full"
        results = validate(workloads, hw, tmp, repeat=args.repeat, quiet=args.quiet, max_wait=args.max_wait,
                           refresh=refresh, dtype=dtype)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "dtype": dtype, "results": results}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
