"""The placement LP on hand-made block models with known optima, and the cost model's structure:
its memory rows against the engine's memory_plan, and its byte and FLOP counts against ModelSpec,
for OPT and for a GQA (Llama-style) model."""
from __future__ import annotations

from dataclasses import replace

import pytest

from flexgen_helm.engine.config import Policy
from flexgen_helm.engine.model_spec import spec_from_name
from flexgen_helm.engine.placement import cache_block_nbytes, layer_layout, memory_plan
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


SPEC = replace(spec_from_name("opt-125m"), name="toy", num_layers=4, hidden=256, num_heads=4, num_kv_heads=4,
               head_dim=64, ffn=1024, vocab_size=1000, max_positions=512)
# Llama-style: RMSNorm, gated MLP, rotary, 8 query heads sharing 2 key/value heads of 32
GQA = replace(spec_from_name("llama-3.2-1b"), name="toy-gqa", num_layers=4, hidden=256, num_heads=8,
              num_kv_heads=2, head_dim=32, ffn=768, vocab_size=1000, max_positions=512)
HW = HardwareProfile(name="toy", device="cpu", dtype="bfloat16", h2d_bw=1e10, d2h_bw=1e10, disk_read_bw=1e9,
                     disk_write_bw=5e8, dev_copy_bw=1e10, mm_curve=[(1, 1e9), (64, 5e10), (4096, 2e11)],
                     attn_prefill_flops=5e10, attn_decode_bw=5e9, host_attn_decode_bw=5e9, dequant_bw=1e9,
                     quant_bw=1e9, layer_overhead_s=1e-4, copy_overlaps_compute=False)


@pytest.mark.parametrize("spec", [SPEC, GQA], ids=["opt", "gqa"])
@pytest.mark.parametrize("percent,ccc", [
    ([100, 0, 100, 0, 100, 0], False), ([30, 50, 40, 35, 100, 0], False), ([0, 40, 0, 50, 0, 100], True),
    ([10, 0, 0, 0, 100, 0], True), ([55, 45, 100, 0, 0, 100], False)])
def test_memory_mirror_matches_engine_plan(percent, ccc, spec):
    """The LP's linear memory rows agree with the engine's memory_plan (to alignment slack)."""
    pol = Policy.from_percent(percent, gpu_batch_size=4, num_gpu_batches=3, cpu_cache_compute=ccc)
    model = build_block_model(spec, HW, 4, 3, 64, 16, 2, ccc)
    x = policy_variables(spec, pol, model)
    plan = memory_plan(spec, pol, 64, 16, 2)
    for tier in ("gpu", "cpu", "disk"):
        assert model.memory[tier].value(x) == pytest.approx(plan[tier], rel=0.01, abs=64 * 1024), tier


def test_offloading_costs_time():
    """More weights / cache off the compute tier never makes the model faster on a copy-bound machine."""
    def t(percent, ccc=False):
        return estimate(SPEC, Policy.from_percent(percent, gpu_batch_size=4, num_gpu_batches=2,
                                                  cpu_cache_compute=ccc), HW, 64, 8, 2).block_s
    # on a CPU compute tier every streamed byte is copied into staging, wherever it lives in RAM
    half, host = t([50, 50, 100, 0, 100, 0]), t([0, 100, 100, 0, 100, 0])
    assert t([100, 0, 100, 0, 100, 0]) < half and half <= host * (1 + 1e-12)  # equal up to rounding
    assert host < t([0, 0, 100, 0, 100, 0])
    assert t([100, 0, 100, 0, 100, 0]) < t([100, 0, 0, 100, 100, 0])
    assert t([100, 0, 0, 100, 100, 0], ccc=True) < t([100, 0, 0, 100, 100, 0])  # CPU attention skips the copy


def test_gqa_kv_cache_is_kv_heads_wide():
    """Llama-3.1-8B: 8 key/value heads of 128, so one position of one layer holds 2 x 8 x 128 fp16
    values (4 KB), a quarter of what a hidden-wide (4096) cache would take."""
    spec = spec_from_name("llama-3.1-8b")
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (32, 8, 128)
    assert spec.kv_bytes_per_token(2) == 2 * 8 * 128 * 2 == spec.hidden
    assert cache_block_nbytes(spec, 4, 100, 2, Policy()) == 4 * 100 * 2 * 8 * 128 * 2


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-8b", "opt-1.3b"])
def test_cost_model_bytes_are_the_spec_and_engine_counts(name):
    """Weights, KV cache and cache traffic in the cost model equal the ModelSpec / engine counts."""
    spec = spec_from_name(name)
    b, K, s, n = 4, 2, 128, 16
    model = build_block_model(spec, HW, b, K, s, n, 2)
    L, kv_tok = spec.num_layers, spec.kv_bytes_per_token(2)
    stored = sum(layer_layout(spec, j, 2, Policy()).nbytes for j in range(L + 2))
    assert model.memory["cpu"]["wc"] == stored
    tied = spec.vocab_size * spec.embed_dim * 2 if spec.tie_embeddings else 0  # the head is stored again
    assert stored == pytest.approx(spec.weight_bytes(2) + tied, rel=1e-5)  # + 64-byte tensor alignment
    assert model.memory["cpu"]["cc"] == L * K * b * (s + n) * kv_tok  # every cache block in host memory
    # everything but the cache on the compute tier: the engine's plan and the estimate agree
    pol = Policy.from_percent([100, 0, 0, 100, 100, 0], gpu_batch_size=b, num_gpu_batches=K)
    x = policy_variables(spec, pol, model)
    plan = memory_plan(spec, pol, s, n, 2)
    assert estimate(spec, pol, HW, s, n, 2).memory == plan
    for tier in ("gpu", "cpu", "disk"):
        assert model.memory[tier].value(x) == pytest.approx(plan[tier], rel=0.01, abs=64 * 1024), tier
    # the cache on disk: each decode step reads every block's prefix and every step writes one position
    steps_ctx = sum(cnt * ctx for cnt, ctx in decode_segments(s, n))
    x = policy_variables(spec, Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=b, num_gpu_batches=K),
                         model)
    assert model.link_bytes["cache disk read"].value(x) == pytest.approx(b * kv_tok * L * K * steps_ctx)
    assert model.link_bytes["cache disk write"].value(x) == pytest.approx(b * kv_tok * L * K * (s + n - 1))


def test_compute_time_counts_the_spec_flops():
    """With flat rates and no overheads, a resident decoder layer's slot lasts exactly its matmul
    FLOPs (ModelSpec.layer_matmul_flops) at the matmul rate plus its K/V bytes at the attention rate;
    the prompt's attention is ModelSpec.attention_flops over half the prompt (causal)."""
    hw = replace(HW, mm_curve=[], mm_flops_prefill=3e11, mm_flops_decode=1e11, layer_overhead_s=0.0,
                 attn_prefill_flops=2e11, attn_decode_bw=4e9, copy_overlaps_compute=True)
    b, K, s, n = 4, 2, 64, 2
    for spec in (SPEC, GQA):
        model = build_block_model(spec, hw, b, K, s, n, 2)
        x = policy_variables(spec, Policy(gpu_batch_size=b, num_gpu_batches=K), model)
        dec = next(sl for sl in model.decode if sl.name.endswith(":dec"))
        ctx = s + 1  # the one decode step attends to the prompt and itself
        want = K * (spec.layer_matmul_flops(b) / 1e11 + b * ctx * spec.kv_bytes_per_token(2) / 4e9)
        assert dec.resources["compute"].value(x) == pytest.approx(want)
        pre = next(sl for sl in model.prefill if sl.name.endswith(":dec"))
        want = K * (spec.layer_matmul_flops(b * s) / 3e11 + spec.attention_flops(b * s, s / 2) / 2e11)
        assert pre.resources["compute"].value(x) == pytest.approx(want)
