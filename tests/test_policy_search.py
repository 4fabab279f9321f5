"""Search: feasible picks on tiny models, budget pressure, the impossible-budget error, the T4
reproduction (regression of the README numbers), other families on the T4 profile, benchmark
prediction, and load_engine(policy="auto")."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flexgen_helm.engine.config import ConfigError, MemoryBudget, Policy
from flexgen_helm.engine.model_spec import spec_from_name
from flexgen_helm.engine.placement import memory_plan
from flexgen_helm.policy import profiler
from flexgen_helm.policy.cost_model import estimate
from flexgen_helm.policy.profiler import HardwareProfile, load_profile
from flexgen_helm.policy.search import SubScenario, auto_policy, predict_benchmark, search, workload_time

HW = HardwareProfile(name="toy", device="cpu", dtype="bfloat16", h2d_bw=1e10, d2h_bw=1e10, disk_read_bw=1e9,
                     disk_write_bw=5e8, dev_copy_bw=1e10, mm_curve=[(1, 2e9), (64, 1e11), (4096, 3e11)],
                     attn_prefill_flops=5e10, attn_decode_bw=5e9, host_attn_decode_bw=5e9, dequant_bw=1e9,
                     quant_bw=1e9, layer_overhead_s=5e-5, copy_overlaps_compute=False)
SPEC = replace(spec_from_name("opt-125m"), name="toy", num_layers=4, hidden=256, num_heads=4, num_kv_heads=4,
               head_dim=64, ffn=1024, vocab_size=1000, max_positions=512)


def _fits(pol: Policy, budget: MemoryBudget, prompt_len: int, gen_len: int) -> dict[str, int]:
    plan = memory_plan(SPEC, pol, prompt_len, gen_len, 2)
    for tier in ("gpu", "cpu", "disk"):
        limit = getattr(budget, tier)
        assert limit is None or plan[tier] <= limit, (tier, plan, budget)
    return plan


def test_unlimited_memory_keeps_everything_on_the_compute_tier():
    res = search(SPEC, prompt_len=32, gen_len=8, budget=MemoryBudget(gpu=10**9, cpu=10**9, disk=0), hw=HW,
                 dtype_bytes=2, num_prompts=16)
    p = res.policy
    assert p.w_gpu_percent == 100 and p.cache_gpu_percent == 100 and p.block_size <= 16 + p.gpu_batch_size


@pytest.mark.parametrize("gpu_mb,cpu_mb", [(12, 100), (6, 100), (4.8, 6)])
def test_tight_budgets_are_respected(gpu_mb, cpu_mb):
    budget = MemoryBudget(gpu=int(gpu_mb * 1e6), cpu=int(cpu_mb * 1e6), disk=10**9)
    res = search(SPEC, prompt_len=32, gen_len=8, budget=budget, hw=HW, dtype_bytes=2, num_prompts=32)
    plan = _fits(res.policy, budget, 32, 8)
    assert res.best.estimate.memory == plan
    if gpu_mb < 8:  # weights (7.6 MB) + workspace cannot all stay on the compute tier
        assert res.policy.w_gpu_percent < 100
    if cpu_mb < 7.6:
        assert res.policy.w_disk_percent > 0 or res.policy.cache_disk_percent > 0


def test_search_beats_the_policies_it_enumerates():
    budget = MemoryBudget(gpu=5 * 10**6, cpu=50 * 10**6, disk=10**9)
    res = search(SPEC, prompt_len=32, gen_len=8, budget=budget, hw=HW, dtype_bytes=2)
    assert all(res.best.per_token_s <= c.per_token_s * 1.0001 for c in res.candidates)
    # and beats simple hand policies that fit
    for pol in (Policy.from_percent([0, 100, 0, 100, 100, 0], gpu_batch_size=4, num_gpu_batches=2),
                Policy.from_percent([0, 100, 0, 100, 0, 100], gpu_batch_size=8, num_gpu_batches=1,
                                    cpu_cache_compute=True)):
        e = estimate(SPEC, pol, HW, 32, 8, 2)
        assert e.throughput <= res.best.estimate.throughput * 1.0001


def test_impossible_budget_names_the_smallest_that_works():
    with pytest.raises(ConfigError, match=r"gpu \(compute-tier\) budget to at least .*MB") as e:
        search(SPEC, prompt_len=32, gen_len=8, budget=MemoryBudget(gpu=10_000, cpu=10**9, disk=10**9), hw=HW,
               dtype_bytes=2)
    need_mb = float(str(e.value).split("at least ")[1].split(" MB")[0])
    # that budget does work
    search(SPEC, prompt_len=32, gen_len=8, budget=MemoryBudget(gpu=int(need_mb * 1e6 * 1.01), cpu=10**9,
                                                               disk=10**9), hw=HW, dtype_bytes=2)


def test_context_overflow_is_config_error():
    with pytest.raises(ConfigError, match="context"):
        search(SPEC, prompt_len=500, gen_len=32, budget=MemoryBudget(gpu=10**9), hw=HW, dtype_bytes=2)


def test_t4_opt30b_matches_flexgen_within_30_percent():
    """The README's reproduction: FlexGen measured 7.32 tok/s for OPT-30B, 512+32, 16 GB T4."""
    budget = MemoryBudget(gpu=15 * 10**9, cpu=200 * 10**9, disk=1500 * 10**9)
    res = search(spec_from_name("opt-30b"), prompt_len=512, gen_len=32, budget=budget, hw=load_profile("t4-gcp"),
                 dtype_bytes=2)
    assert 0.7 * 7.32 <= res.best.estimate.throughput <= 1.3 * 7.32
    assert res.best.estimate.memory["gpu"] <= 15 * 10**9


T4 = MemoryBudget(gpu=16 * 10**9, cpu=200 * 10**9, disk=1500 * 10**9)


def test_t4_llama_8b_policy_fits_and_beats_hand_policies():
    """A GQA model on the paper's machine: the searched policy fits the engine's own memory plan
    and is predicted at least as fast as simple hand policies that fit."""
    spec, hw = spec_from_name("llama-3.1-8b"), load_profile("t4-gcp")
    res = search(spec, prompt_len=512, gen_len=32, budget=T4, hw=hw, dtype_bytes=2, gbs_candidates=(8, 16, 32, 64))
    plan = memory_plan(spec, res.policy, 512, 32, 2, device_is_cuda=True)
    assert res.best.estimate.memory == plan
    assert all(plan[t] <= getattr(T4, t) for t in plan)
    for pol in (Policy.from_percent([0, 100, 0, 100, 100, 0], gpu_batch_size=8, num_gpu_batches=4),
                Policy.from_percent([50, 50, 0, 100, 100, 0], gpu_batch_size=16, num_gpu_batches=2,
                                    cpu_cache_compute=True)):
        e = estimate(spec, pol, hw, 512, 32, 2)
        assert all(e.memory[t] <= getattr(T4, t) for t in e.memory)
        assert e.throughput <= res.best.estimate.throughput * 1.0001


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-3.1-70b", "qwen2.5-72b", "mistral-7b", "qwen3-8b", "opt-175b"])
def test_t4_policies_for_the_readme_models(name):
    spec = spec_from_name(name)
    res = search(spec, prompt_len=512, gen_len=32, budget=T4, hw=load_profile("t4-gcp"), dtype_bytes=2)
    plan = memory_plan(spec, res.policy, 512, 32, 2, device_is_cuda=True)
    assert all(plan[t] <= getattr(T4, t) for t in plan) and res.best.estimate.throughput > 0


def test_benchmark_prediction_sums_blocks():
    subs = [SubScenario("a", 32, 8, 10), SubScenario("b", 64, 1, 3, Policy(gpu_batch_size=2, num_gpu_batches=2))]
    rows = predict_benchmark(SPEC, subs, HW, MemoryBudget(gpu=10**8, cpu=10**9, disk=0), 2)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[1]["blocks"] == 1 and rows[1]["predicted_s"] == pytest.approx(rows[1]["block_s"])
    assert all(r["predicted_s"] > 0 for r in rows)


def test_a_short_last_micro_batch_is_priced_by_its_rows():
    """The engine runs a block's last micro-batch with only the rows left (24 prompts at 16x2: 16 + 8),
    so that block costs what 12x2 does, not a full 16x2 block (validate runs 15-17 measured such a
    policy at 1.22-1.36x the old prediction)."""
    pol = Policy(gpu_batch_size=16, num_gpu_batches=2)
    full = estimate(SPEC, pol, HW, 32, 8, 2)
    part = workload_time(full, SPEC, HW, 24, 2)
    assert part == pytest.approx(estimate(SPEC, replace(pol, gpu_batch_size=12), HW, 32, 8, 2).block_s)
    assert part < 0.9 * full.block_s
    assert workload_time(full, SPEC, HW, 32 + 24, 2) == pytest.approx(full.block_s + part)
    assert workload_time(full, SPEC, HW, 64, 2) == pytest.approx(2 * full.block_s)


@pytest.fixture
def cached_toy_profile(tmp_path, monkeypatch):
    """auto_policy without a profile uses the cached one for this machine: provide it."""
    monkeypatch.setenv("FLEXGEN_HELM_CACHE", str(tmp_path))
    HW.to_json(profiler.cache_path("cpu", "bfloat16"))
    return HW


def test_auto_policy_uses_the_cached_profile(cached_toy_profile):
    budget = MemoryBudget(gpu=5 * 10**6, cpu=10**8, disk=0)
    pol = auto_policy(SPEC, prompt_len=16, gen_len=4, budget=budget, device="cpu", dtype_bytes=2, num_prompts=8)
    assert pol.w_gpu_percent < 100 and pol.w_disk_percent == 0
    _fits(pol, budget, 16, 4)


def test_engine_auto_runs_within_budget(tiny_opt, cached_toy_profile, tmp_path):
    """load_engine(policy="auto") on a tiny checkpoint: the searched policy runs and peaks within budget."""
    from flexgen_helm.engine.model_spec import load_spec
    from flexgen_helm.runtime import load_engine
    spec = load_spec(tiny_opt)
    one = memory_plan(spec, Policy(gpu_batch_size=1), 16, 4, 2)["gpu"]
    budget = MemoryBudget(gpu=int(one * 1.2), cpu=10**8, disk=10**8)  # far from room for a big batch on the gpu
    with load_engine(tiny_opt, policy="auto", device="cpu", dtype=torch.bfloat16, offload_dir=str(tmp_path), budget=budget,
                     prompt_len=16, gen_len=4) as eng:
        assert memory_plan(spec, eng.policy, 16, 4, 2)["gpu"] <= budget.gpu
        prompts = [[2, 5, 6, 7] * 4] * 3
        res = eng.generate(prompts, max_new_tokens=4)
        assert all(len(s) == 4 for s in res.sequences)
        for tier in ("gpu", "cpu", "disk"):
            assert res.stats.peak_memory_bytes[tier] <= getattr(budget, tier), tier


def test_one_text_form_of_a_policy():
    p = Policy.from_percent([20, 80, 0, 100, 0, 100], gpu_batch_size=48, num_gpu_batches=3, cpu_cache_compute=True,
                            compress_cache=True)
    assert p.describe() == "48x3 w 20/80/0 kv 0/100/0 act 0/100/0 cpu-attn kv4"
    assert Policy.from_percent([33.333, 0, 50, 25, 100, 0]).describe() == "1x1 w 33.33/0/66.67 kv 50/25/25 act 100/0/0"


def test_search_picks_the_4bit_kernel_from_the_profile_curves():
    """4-bit weights on a bf16 CPU: the fused kernel is tried against dequantize + dense matmuls, each
    charged at its measured rates. A fused kernel faster than dense at every row count wins; one that
    stays slow where dense matmuls speed up (hardware bf16 at many rows) loses to dequantization."""
    budget = MemoryBudget(gpu=40 * 10**6, cpu=0, disk=0)  # 16-bit weights do not fit at batch 64 (42.7 MB): 4-bit (37.3)

    def pick(hw, gbs):
        res = search(SPEC, prompt_len=32, gen_len=8, budget=budget, hw=hw, dtype_bytes=2, num_prompts=gbs,
                     allow_compression=True, gbs_candidates=(gbs,), ngb_candidates=(1,))
        kernels = {c.estimate.policy.int4_kernel for c in res.candidates if c.estimate.policy.compress_weight}
        assert kernels == {"fused", "dequantize"} or hw.int4_curve == []
        return res.policy

    emulated = replace(HW, mm_curve=[(1, 1e9), (64, 2e9), (4096, 2e9)], int4_curve=[(1, 2e10), (64, 5e10), (4096, 5e10)],
                       dequant_bw=1e8)
    amx = replace(HW, mm_curve=[(1, 1e9), (64, 4e11), (4096, 6e11)], int4_curve=[(1, 2e10), (64, 5e10), (4096, 5e10)],
                  dequant_bw=5e10)
    for hw, gbs, want in ((emulated, 64, "fused"), (amx, 64, "dequantize")):
        p = pick(hw, gbs)
        assert p.compress_weight and p.int4_kernel == want, (hw.mm_curve, p)
    assert pick(HW, 64).int4_kernel == "auto"  # no fused-kernel curve measured: the engine's own rule


def test_a_weight_split_between_two_tiers_leaves_no_disk_share_behind():
    """Percentages that sum to 100 in decimal leave a float residue (1 - 0.09337 - 0.90663 ~ 1e-16):
    it must not count as weights on disk, which would reserve disk staging and make a split between
    the compute tier and the host infeasible under a zero disk budget (found by policy.validate in
    bf16, where the optimum splits opt-125m's weights 9.337 / 90.663)."""
    from flexgen_helm.policy.cost_model import policy_variables
    pol = Policy(w_gpu_percent=9.337, w_cpu_percent=90.663)
    assert 1.0 - 9.337 / 100 - 90.663 / 100 > 0  # the residue this guards against
    assert pol.fractions("w")[2] == 0.0
    x = policy_variables(SPEC, pol)
    assert x["wd"] == 0.0 and x["zw"] == 0.0
    est = estimate(SPEC, pol, HW, 32, 8, 2, exact_memory=False)
    assert est.memory["disk"] == 0, est.memory
    assert Policy(w_gpu_percent=9.337, w_cpu_percent=90.66).fractions("w")[2] == pytest.approx(3e-5)


def test_compute_and_disk_contention_lengthens_only_the_slots_that_touch_the_disk():
    """With a profile whose compute keeps sc of its rate beside a disk stream and whose disk keeps sd
    of its rate beside compute, a slot with C seconds of compute and D of disk lasts
    max(C + D (1 - sc) / sd, D + C (1 - sd) / sc) (or longer, for its other resources); slots
    without disk traffic, and policies without any, are unchanged."""
    from flexgen_helm.policy.cost_model import model_for_policy, policy_variables
    sc, sd = 0.5, 0.8
    hw = replace(HW, compute_share_disk=sc, disk_share_compute=sd)
    host = Policy.from_percent([0, 100, 100, 0, 100, 0], gpu_batch_size=4, num_gpu_batches=2)
    assert estimate(SPEC, host, hw, 32, 8, 2).block_s == pytest.approx(estimate(SPEC, host, HW, 32, 8, 2).block_s)
    disk = Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=4, num_gpu_batches=2)
    base, cont = model_for_policy(SPEC, disk, HW, 32, 8, 2), model_for_policy(SPEC, disk, hw, 32, 8, 2)
    x = policy_variables(SPEC, disk, base)
    for s0, s1 in zip(base.prefill + base.decode, cont.prefill + cont.decode):
        r0 = {k: v.value(x) for k, v in s0.resources.items()}
        c, d = r0["compute"], r0.get("disk", 0.0)
        others = max(v for k, v in r0.items() if k not in ("compute", "disk"))
        expect = max(others, c + d * (1 - sc) / sd, d + c * (1 - sd) / sc) if d else max(others, c)
        assert max(v.value(x) for v in s1.resources.values()) == pytest.approx(expect), s0.name
    slower = estimate(SPEC, disk, hw, 32, 8, 2).block_s / estimate(SPEC, disk, HW, 32, 8, 2).block_s
    assert slower > 1.05
    # and the profile keeps the measured shares through its JSON form (absent in old files: 1.0)
    d = hw.to_dict()
    assert HardwareProfile.from_dict(d).compute_share_disk == sc
    del d["compute_share_disk"], d["disk_share_compute"]
    assert HardwareProfile.from_dict(d).disk_share_compute == 1.0


def test_a_prefix_read_waits_behind_the_weight_stream_only_where_both_are_on_disk():
    """The profile's queueing wait of a small read beside the weight stream lengthens decode only for
    policies whose cache blocks are read from disk while weights also stream from disk: by at most
    one wait per (layer, micro-batch, decode step); a later disk rate scales the wait inversely."""
    from flexgen_helm.policy.profiler import with_disk_rate
    wait = 2e-3
    hw = replace(HW, disk_read_mixed_bw=5e8, disk_read_mixed_latency_s=wait)
    quiet = replace(hw, disk_read_mixed_latency_s=0.0)
    K, gen = 2, 8
    both = Policy.from_percent([0, 0, 0, 0, 100, 0], gpu_batch_size=4, num_gpu_batches=K)
    cache_only = Policy.from_percent([0, 100, 0, 0, 100, 0], gpu_batch_size=4, num_gpu_batches=K)
    weights_only = Policy.from_percent([0, 0, 0, 100, 100, 0], gpu_batch_size=4, num_gpu_batches=K)
    for pol in (cache_only, weights_only):
        assert estimate(SPEC, pol, hw, 32, gen, 2).block_s == pytest.approx(estimate(SPEC, pol, quiet, 32, gen, 2).block_s)
    longer = estimate(SPEC, both, hw, 32, gen, 2).block_s - estimate(SPEC, both, quiet, 32, gen, 2).block_s
    assert 0 < longer <= (gen - 1) * SPEC.num_layers * K * wait * (1 + 1e-9)
    assert with_disk_rate(hw, 2 * hw.disk_read_bw).disk_read_mixed_latency_s == pytest.approx(wait / 2)
    d = hw.to_dict()
    del d["disk_read_mixed_latency_s"]  # profiles from before the probe: no wait known
    assert HardwareProfile.from_dict(d).disk_read_mixed_latency_s == 0.0


def test_a_candidate_just_over_a_budget_is_replanned_to_fit():
    """The LP plans with a linear mirror of the engine's memory plan; a candidate that overshoots a
    budget by a few KB of alignment is re-planned against the exact plan (for the search's choice
    and for validate's alternatives alike), not dropped or run over budget."""
    from flexgen_helm.policy.search import Candidate, confirm, effective_budget
    budget = MemoryBudget(gpu=5 * 10**6, cpu=8 * 10**6, disk=10**9)
    res = search(SPEC, prompt_len=32, gen_len=8, budget=budget, hw=HW, dtype_bytes=2, num_prompts=16)
    p = res.policy
    mem = estimate(SPEC, p, HW, 32, 8, 2).memory
    assert p.w_cpu_percent > 0  # the host tier holds weights, so it can give a few KB back
    tight = MemoryBudget(gpu=budget.gpu, cpu=mem["cpu"] - 4096, disk=budget.disk)
    limits = effective_budget(tight, "cpu", False)
    fit, lps = confirm(SPEC, HW, res.best, limits, 32, 8, 2, 16, Policy())
    assert fit is not None and lps >= 1
    assert fit.estimate.memory["cpu"] <= tight.cpu
    assert (fit.estimate.policy.gpu_batch_size, fit.estimate.policy.num_gpu_batches) == \
        (p.gpu_batch_size, p.num_gpu_batches)
    assert fit.per_token_s >= res.best.per_token_s * 0.999  # less memory: no faster
    # one that fits is kept as it is
    same, lps = confirm(SPEC, HW, res.best, effective_budget(budget, "cpu", False), 32, 8, 2, 16, Policy())
    assert lps == 0 and same.estimate.policy == p
    assert isinstance(same, Candidate)
