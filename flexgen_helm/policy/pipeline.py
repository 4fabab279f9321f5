"""Policy search for a pipelined model: where the stage boundaries go and each stage's policy.

All stages share one micro-batch shape (gpu_batch_size x num_gpu_batches per group) and hold
`groups` groups in flight (one per stage by default, as FlexGen's dist_flex_opt). A stage is
searched as a model of its own decoder layers: its placement comes from the search with the
memory of every group in flight (cache and activations x groups); its time per (step, group) unit
from the cost model with one group, keeping only the embedding/head slots the stage holds.

The pipeline's beat is its slowest stage, and a group's token must also travel round the ring
before its next step: per step, max(groups x slowest unit, sum of units). The split starts from
weight bytes, then is re-balanced on the predicted per-layer times (the embedding and head are
big, and a stage that must offload more is slower per layer) and kept if it predicts faster.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..distributed.engine import default_split
from ..distributed.split import StageSplit, balanced_split
from ..engine.config import ConfigError, MemoryBudget, Policy
from ..engine.model_spec import ModelSpec
from .cost_model import Estimate, build_block_model, model_for_policy, policy_variables
from .profiler import HardwareProfile
from .search import _may_fit, _variants, effective_budget, plan_one, search


@dataclass
class StagePlan:
    stage: int
    layers: tuple[int, int]  # decoder layers [start, stop)
    policy: Policy  # num_gpu_batches = micro-batches per group
    memory: dict[str, int]  # peak bytes per tier with every group in flight
    prefill_unit_s: float  # one group's prefill through this stage
    decode_unit_s: float  # one group's decode step through this stage (mean over the steps)
    embed_head_s: tuple[float, float]  # (embedding, head) share of a decode unit, when held


@dataclass
class PipelinePlan:
    split: StageSplit
    stages: list[StagePlan]
    groups: int
    prompt_len: int
    gen_len: int

    @property
    def rows(self) -> int:
        p = self.stages[0].policy
        return p.gpu_batch_size * p.num_gpu_batches * self.groups

    def _beat(self, units: list[float]) -> float:
        return max(self.groups * max(units), sum(units))

    @property
    def prefill_s(self) -> float:
        """Until every group's first token: the pipeline fill plus the groups behind the slowest stage."""
        u = [s.prefill_unit_s for s in self.stages]
        return sum(u) + (self.groups - 1) * max(u)

    @property
    def decode_s(self) -> float:
        return max(self.gen_len - 1, 0) * self._beat([s.decode_unit_s for s in self.stages])

    @property
    def throughput(self) -> float:
        return self.rows * self.gen_len / (self.prefill_s + self.decode_s)

    @property
    def decode_throughput(self) -> float:
        return self.rows * max(self.gen_len - 1, 0) / self.decode_s if self.decode_s > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"stages": [{"stage": s.stage, "layers": list(s.layers), "policy": s.policy.to_dict(),
                            "describe": s.policy.describe(), "memory": s.memory, "prefill_unit_s": s.prefill_unit_s,
                            "decode_unit_s": s.decode_unit_s} for s in self.stages],
                "bounds": list(self.split.bounds), "groups": self.groups, "rows_per_wave": self.rows,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s, "throughput": self.throughput,
                "decode_throughput": self.decode_throughput}


def _stage_spec(spec: ModelSpec, split: StageSplit, i: int) -> ModelSpec:
    return replace(spec, num_layers=len(split.decoders(i)))


def _unit_times(spec_i: ModelSpec, pol: Policy, hw: HardwareProfile, prompt_len: int, gen_len: int,
                dtype_bytes: int, first: bool, last: bool) -> tuple[float, float, tuple[float, float]]:
    """(prefill s, mean decode step s, (embed, head) decode s) of one group through a stage."""
    model = model_for_policy(spec_i, pol, hw, prompt_len, gen_len, dtype_bytes)
    x = policy_variables(spec_i, pol, model)

    def total(slots, keep_emb: bool, keep_head: bool) -> float:
        out = 0.0
        for s in slots:
            kind = s.name.rsplit(":", 1)[1]
            if (kind == "emb" and not keep_emb) or (kind == "head" and not keep_head):
                continue
            out += s.count * max(r.value(x) for r in s.resources.values())
        return out

    pre = total(model.prefill, first, last) + model.serial.value(x)
    steps = max(gen_len - 1, 1)
    dec = total(model.decode, first, last) / steps
    emb = total([s for s in model.decode if s.name.endswith(":emb")], True, True) / steps
    head = total([s for s in model.decode if s.name.endswith(":head")], True, True) / steps
    return pre, dec, (emb if first else 0.0, head if last else 0.0)


def _fixed_shape(spec_i: ModelSpec, gbs: int, ngb_total: int, prompt_len: int, gen_len: int, budget: MemoryBudget,
                 hw: HardwareProfile, dtype_bytes: int, allow_compression: bool) -> Estimate | None:
    """The search's best placement for one fixed micro-batch shape (engine-exact memory)."""
    limits = effective_budget(budget, hw.device, False)
    base = Policy(pin_weight=hw.device == "cuda")
    best = None
    for ccc, cw, cc, kernel in _variants(hw, allow_compression, dtype_bytes):
        model = build_block_model(spec_i, hw, gbs, ngb_total, prompt_len, gen_len, dtype_bytes, ccc, cw, cc,
                                  int4_kernel=kernel)
        if not _may_fit(model, limits):
            continue
        est, _ = plan_one(spec_i, hw, model, limits, prompt_len, gen_len, dtype_bytes, base, exact_memory=True)
        if est is not None and (best is None or est.throughput > best.throughput):
            best = est
    return best


def plan_stages(spec: ModelSpec, split: StageSplit, gbs: int, ngb: int, groups: int, *, prompt_len: int,
                gen_len: int, budget: MemoryBudget, hw: HardwareProfile, dtype_bytes: int,
                allow_compression: bool = False) -> PipelinePlan:
    """Each stage's policy for a fixed split and micro-batch shape."""
    stages = []
    for i in range(split.stages):
        spec_i = _stage_spec(spec, split, i)
        est = _fixed_shape(spec_i, gbs, ngb * groups, prompt_len, gen_len, budget, hw, dtype_bytes, allow_compression)
        if est is None:
            raise ConfigError(f"stage {i} ({split.describe().split('; ')[i]}) cannot hold {groups} groups of "
                              f"{gbs}x{ngb} in its budget; give it more memory or use fewer stages/groups")
        pol = replace(est.policy, num_gpu_batches=ngb)
        pre, dec, eh = _unit_times(spec_i, pol, hw, prompt_len, gen_len, dtype_bytes, i == 0, i == split.stages - 1)
        stages.append(StagePlan(i, (split.bounds[i], split.bounds[i + 1]), pol, est.memory, pre, dec, eh))
    return PipelinePlan(split, stages, groups, prompt_len, gen_len)


def plan_pipeline(spec: ModelSpec, stages: int, *, prompt_len: int, gen_len: int, budget: MemoryBudget,
                  hw: HardwareProfile, dtype_bytes: int, groups: int | None = None,
                  allow_compression: bool = False, rounds: int = 3) -> PipelinePlan:
    """Split, micro-batch shape and per-stage policies with the highest predicted throughput.
    `budget` is per stage (each stage has its own device, host memory and disk)."""
    groups = groups or stages
    split = default_split(spec, stages)
    # micro-batch shape: the search's choice for the heaviest stage with every group's memory
    heavy = max(range(stages), key=lambda i: len(split.decoders(i)) + (i == 0) + (i == stages - 1))
    free = search(_stage_spec(spec, split, heavy), prompt_len=prompt_len, gen_len=gen_len, budget=budget, hw=hw,
                  dtype_bytes=dtype_bytes, allow_compression=allow_compression).policy
    gbs, ngb = free.gpu_batch_size, max(1, free.num_gpu_batches // groups)
    best = plan_stages(spec, split, gbs, ngb, groups, prompt_len=prompt_len, gen_len=gen_len, budget=budget, hw=hw,
                       dtype_bytes=dtype_bytes, allow_compression=allow_compression)
    for _ in range(rounds):
        per_layer = []
        for st in best.stages:
            n = st.layers[1] - st.layers[0]
            per_layer += [(st.decode_unit_s - sum(st.embed_head_s)) / n] * n
        emb, head = best.stages[0].embed_head_s[0], best.stages[-1].embed_head_s[1]
        new = balanced_split(per_layer, emb, head, stages)
        if new == best.split:
            break
        try:
            cand = plan_stages(spec, new, gbs, ngb, groups, prompt_len=prompt_len, gen_len=gen_len, budget=budget,
                               hw=hw, dtype_bytes=dtype_bytes, allow_compression=allow_compression)
        except ConfigError:
            break
        if cand.throughput <= best.throughput:
            break
        best = cand
    return best


def describe(plan: PipelinePlan) -> list[str]:
    lines = [f"{plan.split.stages} stages, {plan.groups} micro-batch groups in flight, "
             f"{plan.rows} rows per wave; split: {plan.split.describe()}"]
    for st in plan.stages:
        lines.append(f"  stage {st.stage}: layers {st.layers[0]}-{st.layers[1] - 1}  {st.policy.describe()}  "
                     f"unit prefill {st.prefill_unit_s:.3f} s, decode {st.decode_unit_s:.4f} s  peak "
                     + ", ".join(f"{t} {v / 1e9:.2f} GB" for t, v in st.memory.items()))
    lines.append(f"predicted: generation {plan.throughput:.3f} tok/s, decode {plan.decode_throughput:.3f} tok/s "
                 f"(prefill {plan.prefill_s:.1f} s + decode {plan.decode_s:.1f} s per wave)")
    lines.append(f"run it: torchrun --nproc-per-node {plan.split.stages} ... with "
                 f"stages={list(plan.split.bounds)}, pipeline_groups={plan.groups} and each rank's policy above")
    return lines
