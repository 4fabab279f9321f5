"""The placement LP on hand-made block models with known optima, and the cost model's structure."""
from __future__ import annotations

import pytest

from flexgen_helm.engine.config import Policy
from flexgen_helm.engine.model_spec import ModelSpec
from flexgen_helm.engine.placement import memory_plan
from flexgen_helm.policy.cost_model import (BlockModel, Lin, Slot, build_block_model, const, decode_segments,
                                            estimate, policy_variables, var)
from flexgen_helm.policy.profiler import HardwareProfile
from flexgen_helm.policy.search import solve_lp

W = 1000.0  # bytes of weights in the toy models


def _toy(memory_gpu: Lin, resources: dict[str, Lin]) -> BlockModel:
    mem = {"gpu": memory_gpu, "cpu": var("wc", W) + var("cc", 10), "disk": var("wd", W) + var("cd", 10)}
    return BlockModel(1, 1, False, False, False, [Slot("only", 1, resources)], [], Lin(), mem, {}, 10,
                      {"zw": ("wd",)})


def test_lp_splits_weights_to_the_budget():
    # time = max(compute 1, host copy 0.01 s/B of the non-resident part): keep as much on the gpu as fits
    model = _toy(var("wg", W), {"compute": const(1.0), "copy": var("wc", 0.01 * W) + var("wd", 0.1 * W)})
    x = solve_lp(model, {"gpu": 500.0, "cpu": None, "disk": None})
    assert x["wg"] == pytest.approx(0.5) and x["wc"] == pytest.approx(0.5) and x["wd"] == pytest.approx(0.0)


def test_lp_uses_disk_only_when_host_is_full():
    model = _toy(var("wg", W), {"compute": const(1.0), "copy": var("wc", 0.01 * W) + var("wd", 0.1 * W)})
    x = solve_lp(model, {"gpu": 200.0, "cpu": 300.0, "disk": None})
    assert (x["wg"], x["wc"], x["wd"]) == pytest.approx((0.2, 0.3, 0.5))


def test_lp_stops_at_the_compute_bound():
    # once copies hide behind compute (2 s), any split with copy <= 2 is optimal: objective is 2
    model = _toy(var("wg", W), {"compute": const(2.0), "copy": var("wc", 0.001 * W)})
    x = solve_lp(model, {"gpu": 0.0, "cpu": None, "disk": None})
    assert x is not None and x["wc"] == pytest.approx(1.0)


def test_lp_streaming_binary_charges_staging():
    # staging costs 300 B when streamed: with a 1000 B budget all weights fit only if not streamed
    model = _toy(var("wg", W) + var("s", 300.0),
                 {"compute": const(1.0), "copy": var("wc", 0.1 * W) + var("wd", 0.2 * W)})
    x = solve_lp(model, {"gpu": 1000.0, "cpu": None, "disk": None})
    assert x["wg"] == pytest.approx(1.0) and x["s"] == pytest.approx(0.0)
    x = solve_lp(model, {"gpu": 900.0, "cpu": None, "disk": None})  # must stream: 600 B resident + 300 staging
    assert x["s"] == pytest.approx(1.0) and x["wg"] == pytest.approx(0.6)


def test_lp_infeasible_is_none():
    model = _toy(var("wg", W) + const(50.0), {"compute": const(1.0)})
    assert solve_lp(model, {"gpu": 10.0, "cpu": 0.0, "disk": 0.0}) is None


def test_decode_segments_cover_every_step():
    segs = decode_segments(100, 33)
    assert sum(n for n, _ in segs) == 32
    assert segs[0][1] < segs[-1][1]
    assert decode_segments(10, 1) == []


SPEC = ModelSpec("toy", num_layers=4, hidden=256, num_heads=4, ffn=1024, vocab_size=1000, max_positions=512)
HW = HardwareProfile(name="toy", device="cpu", dtype="bfloat16", h2d_bw=1e10, d2h_bw=1e10, disk_read_bw=1e9,
                     disk_write_bw=5e8, dev_copy_bw=1e10, mm_curve=[(1, 1e9), (64, 5e10), (4096, 2e11)],
                     attn_prefill_flops=5e10, attn_decode_bw=5e9, host_attn_decode_bw=5e9, dequant_bw=1e9,
                     quant_bw=1e9, layer_overhead_s=1e-4, copy_overlaps_compute=False)


@pytest.mark.parametrize("percent,ccc", [
    ([100, 0, 100, 0, 100, 0], False), ([30, 50, 40, 35, 100, 0], False), ([0, 40, 0, 50, 0, 100], True),
    ([10, 0, 0, 0, 100, 0], True), ([55, 45, 100, 0, 0, 100], False)])
def test_memory_mirror_matches_engine_plan(percent, ccc):
    """The LP's linear memory rows agree with the engine's memory_plan (to alignment slack)."""
    pol = Policy.from_percent(percent, gpu_batch_size=4, num_gpu_batches=3, cpu_cache_compute=ccc)
    model = build_block_model(SPEC, HW, 4, 3, 64, 16, 2, ccc)
    x = policy_variables(SPEC, pol, model)
    plan = memory_plan(SPEC, pol, 64, 16, 2)
    for tier in ("gpu", "cpu", "disk"):
        assert model.memory[tier].value(x) == pytest.approx(plan[tier], rel=0.01, abs=64 * 1024), tier


def test_offloading_costs_time():
    """More weights / cache off the compute tier never makes the model faster on a copy-bound machine."""
    def t(percent, ccc=False):
        return estimate(SPEC, Policy.from_percent(percent, gpu_batch_size=4, num_gpu_batches=2,
                                                  cpu_cache_compute=ccc), HW, 64, 8, 2).block_s
    # on a CPU compute tier every streamed byte is copied into staging, wherever it lives in RAM
    assert t([100, 0, 100, 0, 100, 0]) < t([50, 50, 100, 0, 100, 0]) <= t([0, 100, 100, 0, 100, 0]) \
        < t([0, 0, 100, 0, 100, 0])
    assert t([100, 0, 100, 0, 100, 0]) < t([100, 0, 0, 100, 100, 0])
    assert t([100, 0, 0, 100, 100, 0], ccc=True) < t([100, 0, 0, 100, 100, 0])  # CPU attention skips the copy
