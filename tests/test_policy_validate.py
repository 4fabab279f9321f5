"""Prediction vs the engine on this machine. The fast test checks the choice of comparison policies;
the slow one runs the engine (python -m flexgen_helm.policy.validate does all workloads)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from flexgen_helm.engine.model_spec import load_spec
from flexgen_helm.policy.profiler import HardwareProfile
from flexgen_helm.policy.search import search
from flexgen_helm.policy.validate import WORKLOADS, Workload, pick_alternatives, validate

HW = HardwareProfile(name="toy", device="cpu", dtype="bfloat16", h2d_bw=6e9, d2h_bw=6e9, disk_read_bw=1e9,
                     disk_write_bw=1e9, dev_copy_bw=6e9, mm_curve=[(1, 1e10), (64, 3e11), (4096, 5e11)],
                     attn_prefill_flops=8e10, attn_decode_bw=6e9, host_attn_decode_bw=6e9, dequant_bw=1e9,
                     quant_bw=3e8, layer_overhead_s=1.5e-4, copy_overlaps_compute=True)


# the same with compute and disk slowing each other down (as measured on a 2-core VM): the LP then
# fills a budget to its edge, where the engine's exact plan overshoots by a few KB of alignment, and
# the alternatives must be re-planned like the choice is (else none of 1.3b's fitted)
HW_CONTENDED = replace(HW, compute_share_disk=0.6, disk_share_compute=0.7)


@pytest.mark.parametrize("hw", [HW, HW_CONTENDED], ids=["independent", "contended"])
@pytest.mark.parametrize("w", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_alternatives_are_feasible_distinct_and_predicted_slower(w: Workload, hw: HardwareProfile):
    spec = load_spec(w.model)
    res = search(spec, prompt_len=w.prompt_len, gen_len=w.gen_len, budget=w.budget, hw=hw, dtype_bytes=2,
                 num_prompts=w.num_prompts)
    alts = pick_alternatives(res.best, res.candidates, spec, hw, w)
    assert len(alts) == 5
    pols = [res.best.estimate.policy] + [a.estimate.policy for a in alts]
    # distinct as the engine runs them: attention on the host changes nothing without cache off the compute tier
    runs_as = {repr(replace(p, cpu_cache_compute=p.attends_on_host)) for p in pols}
    assert len(runs_as) == 6
    for a in alts:
        assert a.per_token_s >= res.best.per_token_s
        for tier in ("gpu", "cpu", "disk"):
            limit = getattr(w.budget, tier)
            assert limit is None or a.estimate.memory[tier] <= limit


def test_alternatives_differ_in_what_the_engine_runs():
    """With validate run 16's measured profile (2 Zen 4 vCPUs, bf16) the 350m cache workload's
    runners-up included policies that differed only in cpu_cache_compute with the whole cache on the
    compute tier, where it changes nothing: one policy timed twice as two alternatives."""
    import json
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "reports", "bench", "policy_validate_run16_bf16_default.json")
    with open(path) as f:
        run = next(r for r in json.load(f)["results"] if r["workload"]["name"] == "350m cache")
    hw = HardwareProfile.from_dict(run["profile"])
    w = next(w for w in WORKLOADS if w.name == "350m cache")
    spec = load_spec(w.model)
    res = search(spec, prompt_len=w.prompt_len, gen_len=w.gen_len, budget=w.budget, hw=hw, dtype_bytes=2,
                 num_prompts=w.num_prompts)
    pols = [res.best.estimate.policy] + [a.estimate.policy for a in pick_alternatives(res.best, res.candidates,
                                                                                      spec, hw, w)]
    assert len(pols) >= 4
    runs_as = {repr(replace(p, cpu_cache_compute=p.attends_on_host)) for p in pols}
    assert len(runs_as) == len(pols), [p.describe() for p in pols]


@pytest.mark.slow
def test_prediction_matches_engine_on_this_machine(tmp_path):
    """Measured generation throughput of the chosen policy within 25% of the prediction, at least as
    fast as the alternatives, and within budget. Needs a quiet machine (see validate.py)."""
    import torch

    torch.set_num_threads(1)
    results = validate(WORKLOADS[:2], None, str(tmp_path), repeat=2, max_wait=120, refresh="full")
    for r in results:
        assert 0.75 <= r["ratio"] <= 1.25, r["workload"]["name"]
        assert r["chosen_is_fastest"], r["workload"]["name"]
        assert all(row["within_budget"] for row in r["rows"])


@pytest.mark.parametrize("available", [1 << 40, 1 << 20])  # room for every engine / for none at once
def test_engines_are_built_per_run_where_their_budgets_do_not_fit_together(tiny_opt, tmp_path, available):
    """Round-robin keeps every engine built only when their host budgets fit in free memory (validate
    run 11 was OOM-killed building six opt-1.3b fp32 engines on 24 GB); otherwise each run builds
    and closes its own engine, with the same runs measured and nothing left in the offload dir."""
    from flexgen_helm.engine.config import Policy
    from flexgen_helm.policy.validate import engines_fit_together, host_bytes, run_policies

    w = Workload("tiny", tiny_opt, 8, 2, 4, "100MB", "100MB", "100MB")
    pols = [Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=50),
            Policy(gpu_batch_size=4, num_gpu_batches=1)]
    assert host_bytes(w) == 200_000_000 and host_bytes(w, {"gpu": 5, "cpu": 7, "disk": 11}) == 12
    assert engines_fit_together([host_bytes(w)] * 2, 1 << 40) and not engines_fit_together([host_bytes(w)] * 2, 1 << 20)
    # the policies' planned memory, not the budgets, where the caller has it (validate does)
    assert engines_fit_together([50_000_000] * 6, 400_000_000) and not engines_fit_together([host_bytes(w)] * 6, 400_000_000)
    logs: list[str] = []
    prompts = [[2, 5 + i, 7, 9, 11, 13, 15, 17] for i in range(4)]
    out = run_policies(w, pols, prompts, str(tmp_path), repeat=2, log=logs.append, dtype="float32",
                       available=available)
    assert [len(o["runs"]) for o in out] == [2, 2]
    assert all(o["throughput"] > 0 and o["peak_memory"]["disk"] > 0 for o in out[:1])
    assert any("each run builds its engine" in m for m in logs) == (available < 1 << 30)
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "offload files left behind"


def test_runs_are_priced_again_at_the_disk_rate_measured_around_them(tiny_opt, tmp_path):
    """Each timed run is bracketed by two disk-rate probes and records their mean; the run's
    prediction at that rate equals the chosen prediction at the profile's rate, and grows as the
    disk slows for a policy that reads weights from disk (not for one that holds them in memory)."""
    from flexgen_helm.engine.config import Policy
    from flexgen_helm.policy.profiler import disk_read_probe, with_disk_rate
    from flexgen_helm.policy.validate import at_run_disk_rate, run_policies

    w = Workload("tiny", tiny_opt, 8, 2, 4, "100MB", "100MB", "100MB")
    on_disk = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=0)
    in_memory = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=100)
    rates = iter([1e9, 3e9, 2e9, 2e9] * 2)
    prompts = [[2, 5 + i, 7, 9, 11, 13, 15, 17] for i in range(4)]
    out = run_policies(w, [on_disk, in_memory], prompts, str(tmp_path), repeat=2, log=lambda s: None,
                       dtype="float32", disk_rate=lambda: next(rates))
    # round-robin: policy 0 round 0 (1, 3 GB/s), policy 1 round 0 (2, 2), then the same again
    assert [r["disk_read_bw"] for r in out[0]["runs"]] == [2e9, 2e9]
    spec = load_spec(tiny_opt)
    hw = replace(HW, disk_read_serial_bw=0.8e9, disk_read_mixed_bw=0.4e9)
    slow = with_disk_rate(hw, 0.5e9)
    assert (slow.disk_read_bw, slow.disk_read_serial_bw, slow.disk_read_mixed_bw) == (0.5e9, 0.4e9, 0.2e9)
    for pol, m in zip([on_disk, in_memory], out):
        for r in m["runs"]:
            r["disk_read_bw"] = hw.disk_read_bw  # the profile's own rate: the same prediction
        assert at_run_disk_rate(spec, pol, hw, w, 4, 10.0, m)["pred_s_run_disk"] == pytest.approx(10.0)
        for r in m["runs"]:
            r["disk_read_bw"] = hw.disk_read_bw / 4
        got = at_run_disk_rate(spec, pol, hw, w, 4, 10.0, m)
        assert (got["pred_s_run_disk"] > 10.5) == (pol is on_disk)
        assert got["ratio_run_disk"] == pytest.approx(got["pred_s_run_disk"] / m["total_s"])
    with disk_read_probe(str(tmp_path), 8 << 20) as rate:
        assert rate(0.05) > 1e6
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "probe or offload files left behind"
