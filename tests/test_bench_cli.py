"""`flexgen-helm bench` end to end on a tiny checkpoint: the JSON a benchmark row is read from."""
from __future__ import annotations

import json

import pytest

from flexgen_helm.cli import main


@pytest.mark.parametrize("kernel", ["fused", "dequantize"])
def test_bench_json_has_bound_breakdown_and_baseline(tiny_opt, tmp_path, monkeypatch, kernel):
    """Weights on disk, 4-bit against the uncompressed engine, with the per-step bound: the keys the
    README's tables cite, and the forced 4-bit kernel recorded in the policy."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b.json"
    assert main(["bench", "--model", tiny_opt, "--prompt-len", "8", "--gen-len", "3", "--gpu-batch-size", "2",
                 "--num-gpu-batches", "2", "--percent", "0", "0", "100", "0", "100", "0", "--compress-weight",
                 "--dtype", "bf16", "--int4-kernel", kernel, "--baseline", "uncompressed", "--repeat", "1",
                 "--bound", "--offload-dir", str(tmp_path), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["policy"]["int4_kernel"] == kernel and d["dtype"] == "bfloat16"
    assert d["generation_throughput"] > 0 and d["baseline"]["system"] == "uncompressed"
    assert d["bytes_moved"]["disk->cpu"] < d["baseline"]["bytes_moved"]["disk->cpu"]  # 4-bit reads less
    assert {"io_wait", "projections_and_mlp", "attention", "head_and_sampling"} <= set(d["time_breakdown_s"])
    b = d["bound"]
    assert b["disk_read_bw"] > 0 and b["disk_read_bw_layer_pieces"] > 0 and 0 < b["fraction_of_bound"]
    assert b["decode_step_bound_s"] > 0 and b["disk_s_per_step_at_layer_rate"] > 0
    # beside it, the same steps with the measured compute/disk contention: never a higher bound
    assert 0 < b["compute_share_beside_disk"] <= 1 and 0 < b["disk_share_beside_compute"] <= 1
    assert b["generation_throughput_bound_with_contention"] <= b["generation_throughput_bound"] * (1 + 1e-9)
    if kernel == "dequantize":
        assert d["time_breakdown_s"]["dequantization_in_io_threads"] > 0


@pytest.mark.parametrize("baseline", ["hf", "accelerate", "accelerate-cpu"])
def test_bench_against_hf_and_accelerate_baselines(tiny_opt, tmp_path, monkeypatch, baseline):
    """The baselines the README's rows and the CUDA acceptance script compare with, on the same weights
    and prompts: each runs and reports its own throughput beside the engine's."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b.json"
    assert main(["bench", "--model", tiny_opt, "--prompt-len", "8", "--gen-len", "3", "--gpu-batch-size", "2",
                 "--num-gpu-batches", "2", "--dtype", "fp32", "--baseline", baseline, "--repeat", "1",
                 "--offload-dir", str(tmp_path), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["baseline"]["system"] == baseline and d["baseline"]["generation_throughput"] > 0
    assert d["speedup_vs_baseline"] == pytest.approx(d["generation_throughput"] / d["baseline"]["generation_throughput"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # offload files of both removed
