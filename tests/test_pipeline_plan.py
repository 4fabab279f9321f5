"""Stage splits and the pipeline's policy search (no processes started)."""
from __future__ import annotations

import itertools
import random

import pytest

from flexgen_helm.distributed.engine import default_split, stage_memory_plan
from flexgen_helm.distributed.split import StageSplit, balanced_split, even_split
from flexgen_helm.engine.config import ConfigError, MemoryBudget, Policy, parse_bytes
from flexgen_helm.engine.model_spec import load_spec
from flexgen_helm.engine.placement import memory_plan


def _brute(costs, emb, head, stages):
    L, best = len(costs), None
    for cut in itertools.combinations(range(1, L), stages - 1):
        b = (0, *cut, L)
        worst = max(sum(costs[b[i]:b[i + 1]]) + (emb if i == 0 else 0) + (head if i == stages - 1 else 0)
                    for i in range(stages))
        best = worst if best is None else min(best, worst)
    return best


def test_balanced_split_is_optimal_and_contiguous():
    rng = random.Random(0)
    for _ in range(30):
        L, S = rng.randint(3, 9), rng.randint(2, 3)
        costs = [rng.uniform(0.5, 2.0) for _ in range(L)]
        emb, head = rng.uniform(0, 4), rng.uniform(0, 4)
        sp = balanced_split(costs, emb, head, S)
        got = max(sum(costs[a:b]) + (emb if i == 0 else 0) + (head if i == S - 1 else 0)
                  for i, (a, b) in enumerate(zip(sp.bounds, sp.bounds[1:])))
        assert got == pytest.approx(_brute(costs, emb, head, S))
        assert sp.bounds[0] == 0 and sp.bounds[-1] == L and all(a < b for a, b in zip(sp.bounds, sp.bounds[1:]))


def test_split_layers_and_bad_bounds():
    sp = even_split(5, 2)
    assert sp.held(0) == {0, 1, 2} and sp.held(1) == {3, 4, 5, 6}
    assert balanced_split([1.0] * 8, 4.0, 0.0, 2).bounds == (0, 2, 8)  # a big embedding: fewer layers on stage 0
    with pytest.raises(ConfigError, match="rise strictly"):
        StageSplit.from_bounds([0, 4, 4], 4, 2)
    with pytest.raises(ConfigError, match="at least 3 decoder layers"):
        even_split(2, 3)


def test_stage_memory_sums_to_the_whole_model_weights():
    spec = load_spec("opt-1.3b")
    pol = Policy(gpu_batch_size=4, w_gpu_percent=0, w_cpu_percent=100)
    whole = memory_plan(spec, pol, 64, 8, 2)
    sp = default_split(spec, 2)
    stages = [stage_memory_plan(spec, pol, sp, i, 64, 8, 2, 1, False) for i in range(2)]
    assert sum(s["cpu"] for s in stages) == whole["cpu"]  # weights are the host tier's only content here


def test_plan_pipeline_balances_time_and_fits_each_stage():
    from flexgen_helm.policy.pipeline import describe, plan_pipeline
    from flexgen_helm.policy.profiler import load_profile
    budget = MemoryBudget(parse_bytes("200MB"), parse_bytes("2GB"), parse_bytes("4GB"))
    plan = plan_pipeline(load_spec("opt-125m"), 2, prompt_len=16, gen_len=4, budget=budget,
                         hw=load_profile("t4-gcp"), dtype_bytes=2)
    assert plan.split.bounds[0] == 0 and plan.split.bounds[-1] == 12
    assert len({(s.policy.gpu_batch_size, s.policy.num_gpu_batches) for s in plan.stages}) == 1
    for st in plan.stages:
        assert st.memory["gpu"] <= budget.gpu and st.memory["cpu"] <= budget.cpu
    units = [s.decode_unit_s for s in plan.stages]
    assert max(units) / min(units) < 1.3  # balanced on predicted time, not layer count
    assert plan.throughput > 0 and "stage 1" in "\n".join(describe(plan))


def test_policy_command_prints_split_and_stage_policies(tmp_path, capsys):
    import json

    from flexgen_helm.cli import main
    out = tmp_path / "plan.json"
    assert main(["policy", "--model", "opt-125m", "--stages", "2", "--gpu-mem", "200MB", "--cpu-mem", "2GB",
                 "--disk-mem", "4GB", "--prompt-len", "16", "--gen-len", "4", "--profile", "t4-gcp",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "split: stage 0: layers 0-" in text and "+ embed" in text and "+ head" in text
    assert "stage 1: layers" in text and "predicted: generation" in text
    plan = json.loads(out.read_text())
    assert len(plan["stages"]) == 2 and plan["bounds"][-1] == 12
    Policy.from_dict(plan["stages"][1]["policy"])  # what `bench --policy plan.json` reads per rank
