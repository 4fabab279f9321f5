"""Policy search: enumerate (gpu_batch_size, num_gpu_batches) and the on/off choices (CPU delegation
of decode attention, weight and cache compression); for each, a small mixed-integer LP in pulp (CBC)
over the placement fractions minimizes the block time under the memory budgets; keep the best.

The LP's memory rows mirror the engine's accounting; every answer is re-checked with the engine's
own `memory_plan` after rounding to what the engine realises (whole cache blocks), and re-solved
with the overshooting tier's budget tightened if it does not fit.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import pulp

from ..engine.config import ConfigError, MemoryBudget, Policy
from ..engine.model_spec import ModelSpec
from .cost_model import BIN_VARS, CONT_VARS, BlockModel, Estimate, build_block_model, estimate
from .profiler import HardwareProfile

TIERS = ("gpu", "cpu", "disk")
GBS_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NGB_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
HOST_SHARE = 0.85  # of MemAvailable, when a host budget is left to "whatever the machine has"


@dataclass
class Candidate:
    estimate: Estimate
    total_s: float  # for the whole workload (num_prompts) or one block
    per_token_s: float


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    lps_solved: int = 0

    @property
    def policy(self) -> Policy:
        return self.best.estimate.policy


def host_available() -> int | None:
    """Bytes the OS could give this process now (Linux MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def effective_budget(budget: MemoryBudget, device: str, use_machine: bool) -> dict[str, float | None]:
    """Per-tier limits, plus "host" (gpu+cpu together when the compute tier is host memory)."""
    out: dict[str, float | None] = {"gpu": budget.gpu, "cpu": budget.cpu, "disk": budget.disk, "host": None}
    if use_machine:
        avail = host_available()
        if avail is not None:
            cap = HOST_SHARE * avail
            if device == "cpu":
                out["host"] = cap
            elif out["cpu"] is None:
                out["cpu"] = cap
    if device == "cuda" and out["gpu"] is None:
        raise ConfigError("give a GPU memory budget (--gpu-mem) when planning for a CUDA device")
    return out


# ---- the LP --------------------------------------------------------------------------------

def _lin(expr, v: dict[str, pulp.LpVariable]):
    return pulp.lpSum(c * (1 if k == "" else v[k]) for k, c in expr.items())


def _new_var(prob: pulp.LpProblem, name: str, lo: float | None, hi: float | None, cat: str = "Continuous"):
    if hasattr(prob, "add_variable"):  # PuLP >= 3.3 attaches variables to the problem
        return prob.add_variable(name, lo, hi, cat=cat)
    return pulp.LpVariable(name, lo, hi, cat=cat)


_SOLVER = None


def _solver():
    """CBC: a system/extra `cbc` (COIN_CMD) when installed, else the binary bundled with PuLP < 4."""
    global _SOLVER
    if _SOLVER is None:
        import warnings
        coin = pulp.COIN_CMD(msg=False)
        if coin.available():
            _SOLVER = coin
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _SOLVER = pulp.PULP_CBC_CMD(msg=False)
            if not _SOLVER.available():
                raise ConfigError("the policy search needs the CBC solver: pip install 'pulp[cbc]' (or pulp<4)")
    return _SOLVER


def solve_lp(model: BlockModel, limits: dict[str, float | None], fixed: dict[str, float] | None = None,
             objective_tier: str | None = None) -> dict[str, float] | None:
    """Variable values minimizing block time (or, with objective_tier, that tier's memory) subject
    to the limits; None if infeasible."""
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    v = {k: _new_var(prob, k, 0, 1) for k in CONT_VARS}
    v.update({k: _new_var(prob, k, 0, 1, "Binary") for k in BIN_VARS})
    v["hc"] = _new_var(prob, "hc", 0, 1)
    prob += v["wg"] + v["wc"] + v["wd"] == 1
    prob += v["cg"] + v["cc"] + v["cd"] == 1
    prob += v["hg"] + v["hc"] == 1
    prob += v["wg"] + v["s"] >= 1  # not streamed (s=0) only when every weight byte is resident
    prob += v["y"] >= v["wg"] + v["s"] - 1  # y = wg * s, from below (it only ever costs time)
    prob += v["q"] >= v["cd"] + v["zw"] - 1  # q = cd * zw, likewise
    for ind, fracs in model.indicators.items():
        for f in fracs:
            prob += v[f] <= v[ind]
    for k, val in (fixed or {}).items():
        prob += v[k] == val
    for tier in TIERS:
        if limits.get(tier) is not None and tier != objective_tier:
            prob += _lin(model.memory[tier], v) <= limits[tier]
    if limits.get("host") is not None and objective_tier not in ("gpu", "cpu"):
        prob += _lin(model.memory["gpu"] + model.memory["cpu"], v) <= limits["host"]
    total = 0
    for i, slot in enumerate(model.prefill + model.decode):
        t = _new_var(prob, f"t{i}", 0, None)
        for r in slot.resources.values():
            prob += t >= _lin(r, v)
        total = total + slot.count * t
    total = total + _lin(model.serial, v)
    if objective_tier is None:
        prob += total
    else:
        prob += _lin(model.memory[objective_tier], v) + 1e-12 * total
    prob.solve(_solver())
    if pulp.LpStatus[prob.status] != "Optimal":
        return None
    return {k: float(var.value() or 0.0) for k, var in v.items()}


def _to_policy(x: dict[str, float], model: BlockModel, base: Policy) -> Policy:
    """LP values -> Policy the engine realises: cache fractions snapped down to whole blocks
    (spilling to the next tier), weights to 1e-4 percent."""
    nb = model.cache_blocks
    n_gpu = math.floor(x["cg"] * nb + 1e-6)
    n_cpu = math.floor((x["cg"] + x["cc"]) * nb + 1e-6) - n_gpu
    wg = max(0.0, min(100.0, round(x["wg"] * 100, 4)))
    wc = max(0.0, min(100.0 - wg, round(x["wc"] * 100, 4)))
    if x["wd"] < 1e-7:
        wc = 100.0 - wg
    hg = x["hg"] > 0.5
    return replace(base, gpu_batch_size=model.gbs, num_gpu_batches=model.ngb,
                   w_gpu_percent=wg, w_cpu_percent=wc,
                   cache_gpu_percent=100.0 * n_gpu / nb, cache_cpu_percent=100.0 * n_cpu / nb,
                   act_gpu_percent=100.0 if hg else 0.0, act_cpu_percent=0.0 if hg else 100.0,
                   cpu_cache_compute=model.cpu_cache_compute, compress_weight=model.compress_weight,
                   compress_cache=model.compress_cache, int4_kernel=model.int4_kernel)


def _fits(mem: dict[str, int], limits: dict[str, float | None]) -> dict[str, float]:
    """Overshoot per limit (empty when it fits)."""
    over = {t: mem[t] - limits[t] for t in TIERS if limits.get(t) is not None and mem[t] > limits[t]}
    if limits.get("host") is not None and mem["gpu"] + mem["cpu"] > limits["host"]:
        over["host"] = mem["gpu"] + mem["cpu"] - limits["host"]
    return over


def plan_one(spec: ModelSpec, hw: HardwareProfile, model: BlockModel, limits: dict[str, float | None],
             prompt_len: int, gen_len: int, dtype_bytes: int, base: Policy,
             fixed: dict[str, float] | None = None, exact_memory: bool = False) -> tuple[Estimate | None, int]:
    """Best policy for one (gbs, ngb, flags) model after rounding to what the engine realises.
    Returns (estimate or None, LPs solved)."""
    lim = dict(limits)
    for attempt in range(5):
        x = solve_lp(model, lim, fixed)
        if x is None:
            return None, attempt + 1
        pol = _to_policy(x, model, base)
        est = estimate(spec, pol, hw, prompt_len, gen_len, dtype_bytes, model=model, exact_memory=exact_memory)
        over = _fits(est.memory, limits)
        if not over:
            return est, attempt + 1
        for t, o in over.items():  # tighten and re-solve: block rounding or mirror drift overshot
            lim[t] = lim[t] - o - 64 * 1024 if lim.get(t) is not None else None
            if lim[t] is not None and lim[t] <= 0:
                return None, attempt + 1
    return None, 5


def _may_fit(model: BlockModel, limits: dict[str, float | None]) -> bool:
    """Cheap precheck: the placement-independent memory alone must fit."""
    for tier in TIERS:
        if limits.get(tier) is not None and model.memory[tier].get("", 0.0) > limits[tier]:
            return False
    return True


def _variants(hw: HardwareProfile, allow_compression: bool, dtype_bytes: int = 2) -> list[tuple[bool, bool, bool, str]]:
    """(cpu_cache_compute, compress_weight, compress_cache, int4_kernel) combinations to try. With
    4-bit weights on a CPU whose profile has the fused kernel's curve, both kernels are tried:
    the model charges one at that curve and the other at dense matmul + dequantization rates."""
    out = []
    both = hw.device == "cpu" and dtype_bytes in (2, 4) and hw.int4_rate(1) is not None
    for cw in ((False, True) if allow_compression else (False,)):
        for cc in ((False, True) if allow_compression else (False,)):
            for ccc in (False, True):
                if ccc and cc and hw.device == "cuda":
                    continue  # host-side dequantization of the cache is slower than moving it (FlexGen)
                for kernel in (("fused", "dequantize") if cw and both else ("auto",)):
                    out.append((ccc, cw, cc, kernel))
    return out


def workload_time(est: Estimate, spec: ModelSpec, hw: HardwareProfile, num_prompts: int | None,
                  dtype_bytes: int) -> float:
    """Seconds for num_prompts prompts: full blocks plus one partial block (fewer micro-batches)."""
    pol = est.policy
    if num_prompts is None:
        return est.block_s
    full, rest = divmod(num_prompts, pol.block_size)
    t = full * est.block_s
    if rest:
        # The engine's last micro-batch holds only the rows left (Engine.generate), so the partial
        # block is priced as k even micro-batches of those rows: block-wide matmuls see the same
        # rows, attention is linear in them. Charging k full micro-batches over-priced a 16x2 policy
        # on 24 prompts by a third (validate runs 15-17: measured 1.22-1.36x its prediction).
        k = math.ceil(rest / pol.gpu_batch_size)
        even = replace(pol, num_gpu_batches=k, gpu_batch_size=math.ceil(rest / k))
        part = estimate(spec, even, hw, est.prompt_len, est.gen_len, dtype_bytes)
        t += part.block_s
    return t


def search(spec: ModelSpec, *, prompt_len: int, gen_len: int, budget: MemoryBudget, hw: HardwareProfile,
           dtype_bytes: int, num_prompts: int | None = None, allow_compression: bool = False,
           use_machine_memory: bool = False, gbs_candidates: tuple[int, ...] = GBS_CANDIDATES,
           ngb_candidates: tuple[int, ...] = NGB_CANDIDATES,
           fixed: dict[str, float] | None = None) -> SearchResult:
    """Best policy for the workload. Raises ConfigError (naming the smallest budgets that would work)
    when nothing fits."""
    if prompt_len < 1 or gen_len < 0:
        raise ConfigError("prompt_len must be >= 1 and gen_len >= 0")
    if prompt_len + gen_len > spec.max_positions:
        raise ConfigError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds {spec.name}'s context "
                          f"of {spec.max_positions}")
    limits = effective_budget(budget, hw.device, use_machine_memory)
    base = Policy(pin_weight=hw.device == "cuda")
    cands: list[Candidate] = []
    lps = 0
    n_eff = gen_len if gen_len > 0 else 1
    variants = _variants(hw, allow_compression, dtype_bytes)
    variant_best = {v: math.inf for v in variants}

    def try_ngb(gbs: int, ngb: int) -> float:
        """Best per-token seconds over the variants at (gbs, ngb); inf when none fits."""
        nonlocal lps
        best = math.inf
        for ccc, cw, cc, kernel in variants:
            model = build_block_model(spec, hw, gbs, ngb, prompt_len, n_eff, dtype_bytes, ccc, cw, cc,
                                      int4_kernel=kernel)
            if not _may_fit(model, limits):
                continue
            est, k = plan_one(spec, hw, model, limits, prompt_len, n_eff, dtype_bytes, base, fixed)
            lps += k
            if est is None:
                continue
            total = workload_time(est, spec, hw, num_prompts, dtype_bytes)
            per_tok = total / ((num_prompts or est.policy.block_size) * n_eff)
            cands.append(Candidate(est, total, per_tok))
            best = min(best, per_tok)
            variant_best[(ccc, cw, cc, kernel)] = min(variant_best[(ccc, cw, cc, kernel)], per_tok)
        return best

    for gi, gbs in enumerate(gbs_candidates):
        if gi >= 3 and len(variants) > 1:  # drop on/off choices that trail far behind by now
            lead = min(variant_best.values())
            variants = [v for v in variants if variant_best[v] <= 2.0 * lead] or variants
        if num_prompts is not None and gbs > num_prompts and gbs != gbs_candidates[0]:
            break
        # doubling scan over the number of micro-batches, then the in-between values around the best
        tried: dict[int, float] = {}
        worse, best_here = 0, math.inf
        for ngb in (c for c in ngb_candidates if c & (c - 1) == 0):
            if num_prompts is not None and gbs * ngb > max(num_prompts, gbs) + gbs - 1:
                break
            tried[ngb] = t = try_ngb(gbs, ngb)
            if t == math.inf:
                break  # more micro-batches only need more memory
            if t < best_here * 0.999:
                best_here, worse = t, 0
            else:
                worse += 1
                if worse >= 2:
                    break
        if not tried or min(tried.values()) == math.inf:
            break  # a larger micro-batch needs more memory still
        top = min(tried, key=tried.get)
        for ngb in ngb_candidates:
            if ngb not in tried and top // 2 < ngb < top * 2 and (
                    num_prompts is None or gbs * ngb <= max(num_prompts, gbs) + gbs - 1):
                tried[ngb] = try_ngb(gbs, ngb)
    cands.sort(key=lambda c: c.per_token_s)
    # Confirm with the engine's own memory_plan, best first (the LP used a linear mirror of it).
    for c in cands[:20]:
        best, k = confirm(spec, hw, c, limits, prompt_len, n_eff, dtype_bytes, num_prompts, base, fixed)
        lps += k
        if best is not None:
            return SearchResult(best, cands, lps)
    raise ConfigError(_infeasible_message(spec, hw, prompt_len, n_eff, dtype_bytes, limits, budget))


def confirm(spec: ModelSpec, hw: HardwareProfile, cand: Candidate, limits: dict[str, float | None],
            prompt_len: int, gen_len: int, dtype_bytes: int, num_prompts: int | None, base: Policy,
            fixed: dict[str, float] | None = None) -> tuple[Candidate | None, int]:
    """The candidate as the engine would realise it within `limits` (effective_budget): as is when
    the engine's own memory_plan fits, else re-planned against that plan (a solution at a budget's
    edge in the LP's linear mirror can overshoot it by a few KB of alignment). (None if it cannot
    fit, LPs solved.)"""
    p = cand.estimate.policy
    exact = estimate(spec, p, hw, prompt_len, gen_len, dtype_bytes)
    if not _fits(exact.memory, limits):
        return Candidate(exact, cand.total_s, cand.per_token_s), 0
    model = build_block_model(spec, hw, p.gpu_batch_size, p.num_gpu_batches, prompt_len, gen_len, dtype_bytes,
                              p.cpu_cache_compute, p.compress_weight, p.compress_cache, int4_kernel=p.int4_kernel)
    est, k = plan_one(spec, hw, model, limits, prompt_len, gen_len, dtype_bytes, base, fixed, exact_memory=True)
    if est is None:
        return None, k
    total = workload_time(est, spec, hw, num_prompts, dtype_bytes)
    return Candidate(est, total, total / ((num_prompts or p.block_size) * gen_len)), k


def _infeasible_message(spec: ModelSpec, hw: HardwareProfile, prompt_len: int, gen_len: int, dtype_bytes: int,
                        limits: dict[str, float | None], budget: MemoryBudget) -> str:
    """Name the smallest budget on one tier that makes the smallest policy (1 x 1) fit."""
    def gb(x: float) -> str:
        return f"{x / 1e9:.3f} GB" if x >= 1e7 else f"{x / 1e6:.2f} MB"

    needs = []
    models = [build_block_model(spec, hw, 1, 1, prompt_len, gen_len, dtype_bytes, ccc, False, False)
              for ccc in (False, True)]
    for tier in TIERS + ("host",):
        if limits.get(tier) is None:
            continue
        best = math.inf
        for model in models:
            relaxed = dict(limits, **{tier: None})
            obj = tier if tier != "host" else None
            x = solve_lp(model, relaxed, objective_tier=obj)
            if x is None:
                continue
            pol = _to_policy(x, model, Policy(pin_weight=hw.device == "cuda"))
            from ..engine.placement import memory_plan
            mem = memory_plan(spec, pol, prompt_len, gen_len, dtype_bytes, device_is_cuda=hw.device == "cuda")
            best = min(best, mem["gpu"] + mem["cpu"] if tier == "host" else mem[tier])
        if best < math.inf:
            name = {"gpu": "the gpu (compute-tier) budget", "cpu": "the cpu budget", "disk": "the disk budget",
                    "host": "host memory (gpu + cpu tiers, both in RAM here)"}[tier]
            needs.append(f"{name} to at least {gb(best)} (now {gb(limits[tier])})")
    head = (f"no policy fits {spec.name} with prompt {prompt_len} + {gen_len} tokens in "
            f"gpu={_fmt(budget.gpu)}, cpu={_fmt(budget.cpu)}, disk={_fmt(budget.disk)}")
    if needs:
        return head + "; even batch 1 x 1 needs more. Raise " + ", or ".join(needs)
    return head + "; raise several budgets (every single-tier relaxation is still infeasible)"


def _fmt(x: int | None) -> str:
    return "unlimited" if x is None else f"{x / 1e9:.3f}GB"


def auto_policy(spec: ModelSpec, *, prompt_len: int, gen_len: int, budget: MemoryBudget, device: str,
                dtype_bytes: int, num_prompts: int | None = None, allow_compression: bool = False,
                profile: HardwareProfile | str | None = None) -> Policy:
    """The policy the search picks for this workload on this machine (profile measured and cached
    on first use unless given)."""
    from .profiler import load_or_measure, load_profile, profile_dtype
    dev = device.split(":")[0]
    if profile is None:
        profile = load_or_measure(dev, profile_dtype(dev, dtype_bytes),
                                  offload_dir=os.environ.get("FLEXGEN_HELM_OFFLOAD_DIR"), spec=spec)
    elif isinstance(profile, str):
        profile = load_profile(profile)
    if profile.device != dev:
        profile = replace(profile, device=dev)
    res = search(spec, prompt_len=prompt_len, gen_len=gen_len, budget=budget, hw=profile,
                 dtype_bytes=dtype_bytes, num_prompts=num_prompts, allow_compression=allow_compression,
                 use_machine_memory=True)
    return res.policy


# ---- benchmark-level prediction ------------------------------------------------------------

@dataclass(frozen=True)
class SubScenario:
    name: str
    prompt_len: int  # padded prompt length of its batches
    gen_len: int
    requests: int  # engine rows: instances x trials x completions
    policy: Policy | None = None  # None: the search picks one for this sub-scenario


def predict_benchmark(spec: ModelSpec, subs: list[SubScenario], hw: HardwareProfile, budget: MemoryBudget,
                      dtype_bytes: int, allow_compression: bool = False,
                      load_s_per_scenario: float = 0.0) -> list[dict]:
    """Predicted wall time per sub-scenario (blocks x block time + optional model load)."""
    rows = []
    for sub in subs:
        if sub.policy is None:
            res = search(spec, prompt_len=sub.prompt_len, gen_len=sub.gen_len, budget=budget, hw=hw,
                         dtype_bytes=dtype_bytes, num_prompts=sub.requests, allow_compression=allow_compression)
            est = res.best.estimate
        else:
            est = estimate(spec, sub.policy, hw, sub.prompt_len, max(sub.gen_len, 1), dtype_bytes)
        t = workload_time(est, spec, hw, sub.requests, dtype_bytes) + load_s_per_scenario
        rows.append({"name": sub.name, "prompt_len": sub.prompt_len, "gen_len": sub.gen_len,
                     "requests": sub.requests, "policy": est.policy, "blocks": math.ceil(sub.requests / est.policy.block_size),
                     "block_s": est.block_s, "predicted_s": t})
    return rows
