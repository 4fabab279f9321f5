"""A randomized run under a policy with weights and KV cache on every tier: the measured peak of
each tier never exceeds its budget, the budget being exactly the memory plan's figure (so the plan
is a true upper bound). Prints the largest peak/budget ratio seen (the README reports it)."""
from __future__ import annotations

import random

import torch

from flexgen_helm.engine.config import MemoryBudget, Policy
from flexgen_helm.engine.engine import Engine
from flexgen_helm.engine.model_spec import load_spec
from flexgen_helm.engine.placement import memory_plan

POLICY = Policy(gpu_batch_size=4, num_gpu_batches=3, w_gpu_percent=30, w_cpu_percent=40,
                cache_gpu_percent=30, cache_cpu_percent=40)  # 30% of weights and of cache on disk
MAX_PROMPT, MAX_GEN, REQUESTS = 200, 16, 200


def test_randomized_run_stays_within_budgets(tiny_opt, tmp_path):
    spec = load_spec(tiny_opt)
    plan = memory_plan(spec, POLICY, MAX_PROMPT, MAX_GEN, 4, prompt_logprobs=True)
    assert all(plan[t] > 0 for t in ("gpu", "cpu", "disk"))  # every tier is in use
    budget = MemoryBudget(plan["gpu"], plan["cpu"], plan["disk"])
    rng = random.Random(14)
    worst = {t: 0.0 for t in plan}
    served = 0
    with Engine.from_pretrained(tiny_opt, policy=POLICY, dtype=torch.float32, offload_dir=str(tmp_path),
                                budget=budget, prompt_len=MAX_PROMPT, gen_len=MAX_GEN) as eng:
        while served < REQUESTS:
            n = min(rng.randint(1, 16), REQUESTS - served)
            prompts = [[2] + [rng.randrange(4, spec.vocab_size) for _ in range(rng.randint(0, MAX_PROMPT - 1))]
                       for _ in range(n)]
            echo = rng.random() < 0.3
            res = eng.generate(prompts, max_new_tokens=rng.choice([0, 1, 4, MAX_GEN]) if echo else rng.randint(1, MAX_GEN),
                               temperature=rng.choice([0.0, 0.8]), top_p=rng.choice([1.0, 0.9]),
                               num_completions=rng.choice([1, 1, 2, 3]), top_logprobs=rng.choice([0, 5]),
                               prompt_logprobs=echo, seed=served)
            for tier, peak in res.stats.peak_memory_bytes.items():
                assert peak <= plan[tier], (tier, peak, plan[tier])
                worst[tier] = max(worst[tier], peak / plan[tier])
            served += n
    print("largest peak/budget per tier:", {t: round(r, 3) for t, r in worst.items()})
    assert all(r > 0 for r in worst.values())
