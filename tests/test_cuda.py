"""The engine on a CUDA compute device against HF transformers on the same weights: every family under
the placement matrix (pinned bounce buffers, streams and events on the disk and host tiers), fp16,
4-bit weights and cache, overlap on and off, and the GPU allocator's real peak against the memory plan.

Skipped without CUDA. `FLEXGEN_TEST_DEVICE=cpu pytest tests/test_cuda.py` runs the same file on the
CPU, which is how its logic is checked on machines without a GPU (scripts/cuda_acceptance.py runs it
on a GPU)."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexgen_helm import Engine, MemoryBudget, Policy
from flexgen_helm.engine import compression as C
from flexgen_helm.engine.config import CompressionConfig
from flexgen_helm.engine.model_spec import load_spec
from flexgen_helm.engine.placement import memory_plan
from flexgen_helm.tiny import TINY_FAMILIES, build_tiny_family
from placements import PLACEMENTS
from test_families import NEW, PROMPTS, hf_gaps, hf_reference

DEVICE = os.environ.get("FLEXGEN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs CUDA (FLEXGEN_TEST_DEVICE=cpu runs it on the CPU)")
ON_CUDA = DEVICE is not None and DEVICE.startswith("cuda")
# fp32 on a GPU: other reduction orders than the CPU's (TF32 stays off: torch's default precision)
FP32_TOL = 1e-3 if ON_CUDA else 1e-4


def _generate(model, policy, tmp_path, dtype=torch.float32, prompts=PROMPTS):
    with Engine.from_pretrained(model, policy=policy, device=DEVICE, dtype=dtype, offload_dir=str(tmp_path)) as eng:
        res = eng.generate(prompts, max_new_tokens=NEW)
    assert os.listdir(tmp_path) == []  # offload files cleaned up
    return res


def _assert_matches(res, ref, tol=FP32_TOL):
    assert res.sequences == ref[0]
    worst = max(abs(a - b) for got, want in zip(res.logprobs, ref[1]) for a, b in zip(got, want))
    assert worst < tol, worst


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def family_ckpt(request, tmp_path_factory):
    return build_tiny_family(str(tmp_path_factory.mktemp(request.param)), request.param, seed=3, tokenizer=False)


@pytest.fixture(scope="module")
def ref(family_ckpt):
    return hf_reference(family_ckpt, PROMPTS, NEW)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_family_and_placement_matches_hf_in_fp32(family_ckpt, ref, tmp_path, placement):
    pol = Policy(gpu_batch_size=2, num_gpu_batches=3, **PLACEMENTS[placement])
    _assert_matches(_generate(family_ckpt, pol, tmp_path), ref)


def test_fp16_greedy_tokens_are_hf_top_choices(family_ckpt, tmp_path):
    """fp16 (the CUDA default): the engine's tokens are HF fp32's top choices up to fp16 near-ties, and
    their logprobs are within fp16 noise of HF's."""
    hf = AutoModelForCausalLM.from_pretrained(family_ckpt, dtype=torch.float32).eval()
    dtype = torch.float16 if ON_CUDA else torch.bfloat16  # CPUs without fp16 matmuls: the 16-bit path
    for placement in ("compute", "mixed"):
        res = _generate(family_ckpt, Policy(gpu_batch_size=3, num_gpu_batches=2, **PLACEMENTS[placement]),
                        tmp_path, dtype=dtype)
        gap, worst = hf_gaps(hf, PROMPTS, res)
        assert gap < 0.1 and worst < 0.5, (placement, gap, worst)


@pytest.mark.parametrize("what", ["w4", "kv4", "w4kv4"])
def test_compressed_path_equals_quantize_dequantize_reference(what, tmp_path_factory, tmp_path):
    d = build_tiny_family(str(tmp_path_factory.mktemp(f"llama-{what}")), "llama", seed=4, tokenizer=False)
    w, kv = "w4" in what, "kv4" in what
    w_cfg, kv_cfg = Policy().comp_weight_config, CompressionConfig(4, 64, -1)

    def prepare(hf):
        if w:
            C.fake_quantize_model(hf, w_cfg)
        return C.fake_quantize_kv_cache(hf, kv_cfg) if kv else []
    ref = hf_reference(d, PROMPTS, NEW, prepare)
    for placement in ("compute", "host-ccc", "disk", "mixed"):
        pol = Policy(gpu_batch_size=3, num_gpu_batches=2, compress_weight=w, compress_cache=kv,
                     **PLACEMENTS[placement])
        res = _generate(d, pol, tmp_path)
        assert res.sequences == ref[0], placement
        diffs = [abs(a - b) for g, r in zip(res.logprobs, ref[1]) for a, b in zip(g, r)]
        # a last-bit difference upstream can move one K/V value across a rounding boundary
        assert sum(x < FP32_TOL for x in diffs) >= 0.9 * len(diffs) and max(diffs) < 5e-2, (placement, max(diffs))


def test_overlap_on_and_off_give_the_same_answers(tmp_path):
    """Loads on their own streams (overlap) against loads in line: the same kernels on the same data."""
    d = build_tiny_family(str(tmp_path / "m"), "qwen3", seed=6, tokenizer=False)
    runs = []
    for overlap in (True, False):
        pol = Policy(gpu_batch_size=2, num_gpu_batches=3, overlap=overlap, **PLACEMENTS["mixed"])
        off = tmp_path / f"off-{overlap}"
        off.mkdir()
        runs.append(_generate(d, pol, off))
    assert runs[0].sequences == runs[1].sequences
    assert runs[0].logprobs == runs[1].logprobs


def test_allocator_peak_stays_within_the_memory_plan(tmp_path):
    """The compute tier's budget is exactly the plan's figure; on CUDA, what the allocator really
    held at its peak (every tensor: weights, staging, cache, activations, temporaries) stays within it,
    up to cuBLAS's workspace."""
    model = "dummy:opt-125m"
    pol = Policy(gpu_batch_size=8, num_gpu_batches=2, w_gpu_percent=40, w_cpu_percent=30,
                 cache_gpu_percent=50, cache_cpu_percent=50)
    prompt_len, gen_len = 64, 8
    dtype = torch.float16 if ON_CUDA else torch.float32
    plan = memory_plan(load_spec(model), pol, prompt_len, gen_len, dtype.itemsize, device_is_cuda=ON_CUDA)
    budget = MemoryBudget(plan["gpu"], plan["cpu"], plan["disk"])
    g = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(4, 50000, (prompt_len - 1,), generator=g).tolist() for _ in range(16)]
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with Engine.from_pretrained(model, policy=pol, device=DEVICE, dtype=dtype, offload_dir=str(tmp_path),
                                budget=budget, prompt_len=prompt_len, gen_len=gen_len) as eng:
        res = eng.generate(prompts, max_new_tokens=gen_len)
    for tier, peak in res.stats.peak_memory_bytes.items():
        assert peak <= plan[tier], (tier, peak, plan[tier])
    if ON_CUDA:
        held = torch.cuda.max_memory_allocated() - base
        slack = 32 << 20  # cuBLAS workspace and the allocator's 512-byte rounding
        print(f"allocator peak {held / 2**20:.1f} MiB, plan {plan['gpu'] / 2**20:.1f} MiB")
        assert held <= plan["gpu"] + slack, (held, plan["gpu"])
