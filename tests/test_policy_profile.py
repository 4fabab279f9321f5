"""Hardware profile: JSON round trip, shipped T4 profiles, rate interpolation, curve keys per layer
shape, a quick measurement (OPT widths and a GQA model's own shape)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from flexgen_helm.engine.config import ConfigError
from flexgen_helm.engine.model_spec import spec_from_name
from flexgen_helm.policy import profiler
from flexgen_helm.policy.profiler import (HardwareProfile, head_key, layer_key, load_or_measure, load_profile,
                                          measure_profile, opt_probe_spec, with_widths)

# a small Llama-style model: GQA (4 query heads per key/value head), head_dim != hidden / heads
TOY_GQA = replace(spec_from_name("llama-3.2-1b"), name="toy-gqa", num_layers=2, hidden=96, num_heads=4,
                  num_kv_heads=1, head_dim=32, ffn=256, vocab_size=300)


def _profile() -> HardwareProfile:
    return HardwareProfile(name="x", device="cpu", dtype="bfloat16", h2d_bw=1e10, d2h_bw=9e9, disk_read_bw=1e9,
                           disk_write_bw=5e8, dev_copy_bw=1e10, mm_curve=[(1, 1e9), (64, 1e11), (4096, 4e11)],
                           layer_overhead_s=1e-4, meta={"host": "h"})


def test_json_round_trip(tmp_path):
    p = _profile()
    path = tmp_path / "hw.json"
    p.to_json(str(path))
    q = HardwareProfile.from_json(str(path))
    assert q == p
    assert json.loads(path.read_text())["schema"] == profiler.SCHEMA
    p.layer_curves = {768: [(1, 1e9), (64, 5e10)], 2048: [(1, 2e9), (64, 8e10)],
                      layer_key(TOY_GQA): [(1, 3e9), (64, 9e10)]}
    p.to_json(str(path))
    q = HardwareProfile.from_json(str(path))
    assert q == p and q.layer_rate(64, spec_from_name("opt-125m")) == pytest.approx(5e10)
    assert q.layer_rate(64, TOY_GQA) == pytest.approx(9e10)  # its own shape, not the OPT widths


def test_curve_keys():
    """OPT layers keep the integer keys of older profiles; other shapes get a key of their own."""
    assert layer_key(spec_from_name("opt-30b")) == 7168 and head_key(spec_from_name("opt-30b")) == 7168
    assert layer_key(opt_probe_spec(192)) == 192
    assert head_key(spec_from_name("opt-350m")) == "opt:1024:512:50272"  # projected 512-wide head
    assert layer_key(spec_from_name("llama-3.1-70b")) == "llama:8192:28672:64:8:128"
    assert head_key(spec_from_name("llama-3.1-70b")) == "llama:8192:8192:128256"
    assert layer_key(spec_from_name("qwen3-8b")) != layer_key(spec_from_name("llama-3.1-8b"))


def test_missing_shape_falls_back_to_opt_widths():
    """A profile measured for OPT models (another machine's) still rates other families' layers,
    from its OPT-shaped curves at the same hidden width."""
    p = _profile()
    p.layer_curves = {2048: [(1, 2e9), (64, 8e10)], 8192: [(1, 4e9), (64, 2e11)]}
    assert p.layer_rate(64, spec_from_name("llama-3.1-70b")) == pytest.approx(2e11)
    assert p.layer_rate(64, spec_from_name("llama-3.2-1b")) == pytest.approx(8e10)
    assert p.head_rate(4, spec_from_name("llama-3.2-1b")) is None  # no head curves at all


def test_missing_field_is_config_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "device": "cpu"}))
    with pytest.raises(ConfigError, match="lacks"):
        HardwareProfile.from_json(str(path))


@pytest.mark.parametrize("name", ["t4-gcp", "t4-gcp-ssd"])
def test_shipped_t4_profiles(name):
    p = load_profile(name)
    assert p.device == "cuda" and p.h2d_bw == pytest.approx(12.89e9)
    assert p.mm_rate(48, prefill=False) == pytest.approx(4.3e12)
    assert p.mm_rate(48 * 512, prefill=True) == pytest.approx(21.24e12)
    assert p.disk_read_bw == pytest.approx(0.473e9 if name == "t4-gcp" else 2.0e9)


def test_unknown_profile_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="t4-gcp"):
        load_profile("no-such-profile")


def test_mm_rate_interpolates_log_log():
    p = _profile()
    assert p.mm_rate(64, True) == pytest.approx(1e11)
    assert p.mm_rate(8, True) == pytest.approx(1e10, rel=1e-6)  # geometric midpoint of 1 and 64
    assert p.mm_rate(10**6, True) == pytest.approx(4e11)  # flat beyond the last point
    assert p.mm_rate(1, True) < p.mm_rate(2, True) < p.mm_rate(64, True)


def test_quick_measurement_and_cache(tmp_path, monkeypatch):
    """A very short profile on the CPU: every rate positive, cached for the next call."""
    monkeypatch.setenv("FLEXGEN_HELM_CACHE", str(tmp_path / "cache"))
    p = measure_profile("cpu", "float32", offload_dir=str(tmp_path), budget_s=0.2, disk_mb=8, hidden=128,
                        widths=(64, 128), quick=True)
    for f in ("h2d_bw", "d2h_bw", "disk_read_bw", "disk_write_bw", "dev_copy_bw", "attn_prefill_flops",
              "attn_decode_bw", "host_attn_decode_bw", "dequant_bw", "quant_bw", "layer_overhead_s"):
        assert getattr(p, f) > 0, f
    # measured as differences of two timings, clamped at 0: legitimately 0 when below the noise
    for f in ("sched_overhead_s", "disk_block_s"):
        assert getattr(p, f) >= 0, f
    assert 0 < p.compute_share_disk <= 1 and 0 < p.disk_share_compute <= 1
    assert len(p.mm_curve) >= 5
    from flexgen_helm.engine import kernels
    if kernels.available():  # fp32: the compiled 4-bit multiply's curve (the engine's fp32 fused path)
        assert p.int4_curve and all(rate > 0 for _, rate in p.int4_curve)
    assert set(p.layer_curves) == {64, 128} and set(p.head_curves) == {64, 128}
    assert p.layer_rate(8, opt_probe_spec(128)) > 0 and p.head_rate(4, opt_probe_spec(64)) > 0
    p.to_json(str(tmp_path / "cache" / "x.json"))
    path = profiler.cache_path("cpu", "float32")
    p.to_json(path)
    assert load_or_measure("cpu", "float32") == p  # served from the cache, not re-measured
    # a model of another shape: its layer and head curves are measured now and cached with the rest
    q = load_or_measure("cpu", "float32", spec=TOY_GQA)
    assert set(q.layer_curves) == {64, 128, layer_key(TOY_GQA)} and set(q.head_curves) == {64, 128, head_key(TOY_GQA)}
    assert q.layer_curves[64] == p.layer_curves[64] and q.layer_rate(8, TOY_GQA) > 0 and q.head_rate(4, TOY_GQA) > 0
    assert load_or_measure("cpu", "float32") == q
    assert load_or_measure("cpu", "float32", spec=TOY_GQA) == q  # nothing left to measure


def test_a_cached_profile_older_than_a_measured_field_is_measured_again(tmp_path, monkeypatch):
    """Cached before the compute/disk contention shares existed, a profile would predict with their
    defaults (no contention): the cache is measured again instead."""
    monkeypatch.setenv("FLEXGEN_HELM_CACHE", str(tmp_path))
    path = profiler.cache_path("cpu", "float32")
    _profile().to_json(path)
    d = json.loads(open(path).read())
    d["schema"] = 2
    del d["compute_share_disk"], d["disk_share_compute"]
    with open(path, "w") as f:
        json.dump(d, f)
    fresh = replace(_profile(), name="fresh", compute_share_disk=0.6)
    monkeypatch.setattr(profiler, "measure_profile", lambda **kw: fresh)
    assert load_or_measure("cpu", "float32") == fresh
    monkeypatch.setattr(profiler, "measure_profile", lambda **kw: pytest.fail("measured twice"))
    assert load_or_measure("cpu", "float32") == fresh  # cached now, at the current schema


def test_other_machines_profiles_are_not_extended():
    p = _profile()  # measured on host "h", not here
    assert with_widths(p, TOY_GQA) is p
    assert with_widths(load_profile("t4-gcp"), spec_from_name("llama-3.1-70b")).layer_curves == {}


def test_every_command_reads_dtype_names_one_way():
    """One parser for --dtype: short and torch names, any case; anything else is a clear error that
    lists what to use (bench, accuracy, validate, the profile command and the HELM client use it)."""
    from flexgen_helm.engine.config import ConfigError, dtype_name
    assert [dtype_name(n) for n in ("bf16", "BFloat16", "fp16", "half", "fp32", "float32")] == [
        "bfloat16", "bfloat16", "float16", "float16", "float32", "float32"]
    with pytest.raises(ConfigError, match="use bf16, fp16 or fp32"):
        dtype_name("int8")
    from flexgen_helm.policy import validate
    with pytest.raises(SystemExit):  # argparse's error exit, before anything is measured
        validate.main(["--dtype", "fp8"])


def test_timings_are_the_median_call_not_the_fastest(monkeypatch):
    """An engine run is a long sum of calls: the profile prices a call by its median sample (the
    20th percentile it used before left every prediction optimistic on a jittery VM)."""
    samples = iter([0.0, 5.0, 1.0, 9.0, 2.0, 7.0, 3.0])  # seconds per call after the warm-up call
    clock = [0.0]
    current = [0.0]

    def fn():
        current[0] = next(samples)

    def perf_counter():  # each call's sample elapses between the two clock reads around it
        clock[0] += current[0]
        current[0] = 0.0
        return clock[0]
    monkeypatch.setattr(profiler.time, "perf_counter", perf_counter)
    assert profiler._timeit(fn, lambda: None, min_time=0.0, min_reps=6, max_reps=6) == 5.0  # 1 2 3 5 7 9


def test_curves_bracket_the_engines_kernel_switches():
    """The layer and head curves have points on both sides of every row count where the engine's
    linear() changes kernel, close enough that interpolation does not cross a switch blindly."""
    from flexgen_helm.engine import layers
    for switch in (layers.BF16_LOOP_MAX_ROWS, layers.INT4_LOOP_MAX_ROWS):
        below = max(r for r in profiler.CURVE_ROWS if r <= switch)
        above = min(r for r in profiler.CURVE_ROWS if r > switch)
        assert below == switch and above <= 1.5 * switch, switch


def test_cpu_copies_are_priced_between_compute_calls_where_they_share_its_cores(tmp_path, monkeypatch):
    """Where the engine copies weights on the compute's own cores (between compute calls), the
    profile's copy rates are the ones measured there, and an I/O refresh keeps them; with a core to
    spare, the plain copy rates stand (the copies then overlap compute in an I/O thread)."""
    from flexgen_helm.engine import tiers
    monkeypatch.setattr(profiler, "_copy_between_compute", lambda work, nbytes, per: 1.25e9)
    for shares in (True, False):
        monkeypatch.setattr(tiers, "copies_share_compute_cores", lambda dev, v=shares: v)
        p = measure_profile("cpu", "float32", offload_dir=str(tmp_path), budget_s=0.2, disk_mb=8, hidden=128,
                            widths=(), quick=True)
        assert p.copy_overlaps_compute is not shares
        assert (p.h2d_bw == p.d2h_bw == p.dev_copy_bw == 1.25e9) is shares
        q = profiler.refresh_io(p, str(tmp_path), seconds=0.1)
        assert (q.h2d_bw == 1.25e9) is shares and q.disk_read_bw > 0
