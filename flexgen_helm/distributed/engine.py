"""`DistributedEngine`: one stage of a pipelined model, what `Engine.from_pretrained(...,
distributed=True)` returns inside processes started by torchrun.

Every rank builds its stage (its own policy and budget), then all ranks agree on the model, dtype,
micro-batch shape and split before any weight is loaded. Every rank calls `generate` with the same
arguments (rank 0's are broadcast and compared); rank 0 gets the `GenerationResult`, the others
`None`. `serve()` lets ranks > 0 follow rank 0's calls instead (HELM runs on rank 0 only) until
rank 0 closes the engine.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace

import torch

from ..engine.config import ConfigError, MemoryBudget, Policy, default_dtype
from ..engine.engine import (Engine, GenerationResult, GenerationStats, Outputs, _check_policy, default_budget,
                             left_padded_micro_batch, over_budget, resolve_device)
from ..engine.model_spec import ModelSpec, load_spec
from ..engine.placement import layer_layout, memory_plan, widens, workspace_nbytes
from ..engine.sampling import SamplingParams
from ..engine.scheduler import BlockTiming
from ..engine.tiers import align_up
from ..engine.weights import CheckpointReader, DummyReader, check_checkpoint, resolve_checkpoint
from .comm import Channel, PipelineError, init_process_group
from .split import StageSplit, balanced_split
from .stage_run import StageRun, StageTimeline


@dataclass
class PipelineStats(GenerationStats):
    """GenerationStats of the whole pipeline (bytes summed, peaks the max over stages) plus one
    entry per stage: its layers, policy, peaks, and where its time went (the last wave's per
    (step, group) units and totals over the call)."""

    stages: list[dict] = field(default_factory=list)


def stage_memory_plan(spec: ModelSpec, policy: Policy, split: StageSplit, stage: int, prompt_len: int,
                      gen_len: int, dtype_bytes: int, groups: int, device_is_cuda: bool) -> dict[str, int]:
    """Peak bytes per tier of one stage: the engine's plan for its decoder layers, with the cache,
    activations and micro-batches of `groups` groups in flight, less the embedding/head it lacks."""
    n = len(split.decoders(stage))
    local = replace(spec, num_layers=n)
    plan = memory_plan(local, replace(policy, num_gpu_batches=policy.num_gpu_batches * groups), prompt_len, gen_len,
                       dtype_bytes, device_is_cuda=device_is_cuda)
    for j, held in ((0, stage == 0), (n + 1, stage == split.stages - 1)):
        if not held:
            gb, cb, db = layer_layout(local, j, dtype_bytes, policy).segments(policy)
            plan["gpu"] -= gb
            plan["cpu"] -= cb
            plan["disk"] -= align_up(db) if db else 0
    return plan


def default_split(spec: ModelSpec, stages: int, dtype_bytes: int = 2) -> StageSplit:
    """Layers balanced by weight bytes (offloaded decoding streams every weight each step); the
    policy search's per-stage time balance (flexgen_helm.policy.pipeline) refines this."""
    per = [float(spec.layer_params(j)) for j in range(spec.num_layers + 2)]
    return balanced_split(per[1:-1], per[0], per[-1], stages)


def stage_plan(path: str, rank: int) -> tuple[Policy, list[int], int]:
    """(policy, stage bounds, pipeline groups) of stage `rank` from the JSON that
    `flexgen-helm policy --stages N --json` writes."""
    try:
        with open(path) as f:
            d = json.load(f)
        return Policy.from_dict(d["stages"][rank]["policy"]), list(d["bounds"]), int(d["groups"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"cannot read stage {rank} from pipeline plan {path} ({e}); write it with "
                          "`flexgen-helm policy --stages N --json FILE`") from e


class DistributedEngine:
    def __init__(self, stage_engine: Engine, channel: Channel, split: StageSplit, groups: int, model_name: str,
                 owns_group: bool):
        self.stage_engine, self.ch, self.split, self.groups = stage_engine, channel, split, groups
        self.spec, self.policy = stage_engine.spec, stage_engine.policy
        self.device, self.dtype = stage_engine.device, stage_engine.dtype
        self.model_name = model_name
        self.rank, self.world = channel.rank, channel.world
        self.owns_group = owns_group
        self.closed = False
        self.broken = False  # a peer failed: no more collectives, just free local memory

    @property
    def max_context(self) -> int:
        return self.spec.max_positions

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, policy: Policy, device: str = "cpu", dtype: torch.dtype | None = None,
                        offload_dir: str | None = None, budget: MemoryBudget | None = None, prompt_len: int = 512,
                        gen_len: int = 32, stages: list[int] | None = None, pipeline_groups: int | None = None,
                        timeout_s: float | None = None) -> "DistributedEngine":
        """Stage RANK of WORLD_SIZE (torchrun's environment). `policy`/`budget`/`offload_dir` are this
        stage's own. `stages`: decoder-layer bounds [0, b1, ..., L] (default: balanced by weight bytes);
        `pipeline_groups`: micro-batch groups in flight (default: one per stage). `timeout_s` (default
        $FLEXGEN_PIPELINE_TIMEOUT_S or 1800): how long a stage waits for a peer before it gives up; a
        peer that dies is noticed at once (its sockets close), one that hangs after this long."""
        if not isinstance(policy, Policy):
            raise ConfigError(f"a pipeline stage takes a concrete Policy, got {policy!r}; for the policy search run "
                              "`flexgen-helm policy --model M --stages N ... --json plan.json` and give each rank "
                              "flexgen_helm.distributed.engine.stage_plan('plan.json', rank)")
        dev = resolve_device(device)
        dtype = dtype or getattr(torch, default_dtype(dev.type))
        budget = budget or MemoryBudget()
        already = torch.distributed.is_available() and torch.distributed.is_initialized()
        timeout_s = timeout_s or float(os.environ.get("FLEXGEN_PIPELINE_TIMEOUT_S", "1800"))
        rank, world = init_process_group(dev, timeout_s)
        ch = Channel(rank, world, dev if dev.type == "cuda" else torch.device("cpu"))
        groups = pipeline_groups or world
        # every rank's local checks, then one agreement round before any weight is read
        error, spec, split, plan = None, None, None, {}
        try:
            _check_policy(policy)
            if groups < 1:
                raise ConfigError("pipeline_groups must be >= 1")
            if offload_dir is not None and not os.path.isdir(offload_dir):
                raise ConfigError(f"offload directory {offload_dir} does not exist; create it first")
            spec = load_spec(model)
            split = (StageSplit.from_bounds(stages, spec.num_layers, world) if stages is not None
                     else default_split(spec, world))
            budget = default_budget(dev, budget)
            plan = stage_memory_plan(spec, policy, split, rank, min(prompt_len, spec.max_positions), gen_len,
                                     dtype.itemsize, groups, dev.type == "cuda")
            over = over_budget(plan, budget)
            if over:
                tier, need, limit = over
                raise ConfigError(
                    f"stage {rank} ({split.describe().split('; ')[rank]}) needs {need / 1e9:.3f} GB on the {tier} "
                    f"tier for prompt {prompt_len} + {gen_len} tokens with {groups} micro-batch groups in "
                    f"flight, but its budget is {limit / 1e9:.3f} GB; raise it, lower the batch sizes or "
                    "pipeline_groups, or move weights/cache to a lower tier")
            if plan["disk"] and offload_dir is None:
                raise ConfigError(f"stage {rank}'s policy puts weights or cache on disk: pass offload_dir")
        except ConfigError as e:
            error = str(e)
        mine = {"model": model, "dtype": str(dtype), "device": dev.type, "gpu_batch_size": policy.gpu_batch_size,
                "num_gpu_batches": policy.num_gpu_batches, "groups": groups,
                "bounds": list(split.bounds) if split else None, "error": error}
        try:
            everyone = ch.all_gather_json(mine)
        except PipelineError:
            if error:
                raise ConfigError(error) from None
            raise
        errors = [f"rank {r}: {m['error']}" for r, m in enumerate(everyone) if m["error"]]
        if errors:
            raise ConfigError("a pipeline stage cannot start: " + " | ".join(errors))
        for key in ("model", "dtype", "device", "gpu_batch_size", "num_gpu_batches", "groups", "bounds"):
            values = [m[key] for m in everyone]
            if any(v != values[0] for v in values):
                listed = ", ".join(f"rank {r}={v}" for r, v in enumerate(values))
                raise ConfigError(f"ranks disagree on {key}: {listed}; every rank must pass the same model, dtype, "
                                  "device type, gpu_batch_size, num_gpu_batches, stages and pipeline_groups "
                                  "(placements and budgets may differ)")
        if model.startswith("dummy:"):
            reader = DummyReader(spec)
        else:
            path = resolve_checkpoint(model)
            spec = load_spec(path)
            reader = CheckpointReader(path, spec)
            check_checkpoint(reader, spec)
        stage = Engine(spec, policy, reader, dev, dtype, offload_dir, budget, model, held=split.held(rank))
        return cls(stage, ch, split, groups, model, owns_group=not already)

    # ---- generation ------------------------------------------------------------------------
    def generate(self, input_ids: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, num_completions: int = 1,
                 stop_token_ids: list[int] | list[list[int]] | None = None,
                 stop_sequences: list[list[tuple[int, ...]]] | None = None, top_logprobs: int = 0,
                 prompt_logprobs: bool = False, seed: int = 0, progress=None) -> GenerationResult | None:
        """Collective: every rank calls it with the same arguments; rank 0 returns the result."""
        args = json.loads(json.dumps(dict(
            input_ids=input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            num_completions=num_completions, stop_token_ids=stop_token_ids, stop_sequences=stop_sequences,
            top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs, seed=seed)))
        if self.closed:
            raise ConfigError("this engine is closed")
        msg = self._collective(lambda: self.ch.broadcast_json({"op": "generate", "args": args} if self.rank == 0
                                                               else None))
        same = msg["args"] == args
        agree = self._collective(lambda: self.ch.all_gather_json(same))
        if not all(agree):
            bad = [r for r, ok in enumerate(agree) if not ok]
            raise ConfigError(f"ranks {bad} called generate with arguments other than rank 0's; every rank must "
                              "pass the same ones (or call serve() on ranks > 0)")
        return self._run(args, progress)

    def serve(self) -> None:
        """Ranks > 0: run every generate rank 0 issues, until rank 0 closes the engine."""
        if self.rank == 0:
            raise ConfigError("serve() is for ranks > 0; rank 0 calls generate() and close()")
        while not self.closed:
            msg = self._collective(lambda: self.ch.broadcast_json(None))
            if msg["op"] == "close":
                self._release()
                return
            self._collective(lambda: self.ch.all_gather_json(True))
            try:
                self._run(msg["args"], None)
            except ConfigError:
                continue  # bad request: rank 0 raised the same error to its caller and goes on

    def _collective(self, fn):
        try:
            return fn()
        except PipelineError:
            self.broken = True
            raise

    def _run(self, args: dict, progress) -> GenerationResult | None:
        a = args
        input_ids, max_new = a["input_ids"], a["max_new_tokens"]
        Engine._check_inputs(self, input_ids, max_new, a["temperature"], a["top_p"], a["top_k"],
                             a["num_completions"], a["top_logprobs"], a["stop_token_ids"], a["stop_sequences"])
        num_completions = a["num_completions"]
        if a["prompt_logprobs"] and num_completions > 1 and max_new == 0:
            num_completions = 1
        n = len(input_ids)
        stop_ids = Engine._per_prompt_stops(a["stop_token_ids"], n)
        stop_seqs = ([list(map(tuple, s)) for s in a["stop_sequences"]] if a["stop_sequences"]
                     else [[] for _ in range(n)])
        params = SamplingParams(a["temperature"], a["top_p"], a["top_k"], a["top_logprobs"])
        rows = [(p, c) for p in range(n) for c in range(num_completions)]
        order = sorted(range(len(rows)), key=lambda r: len(input_ids[rows[r][0]]))  # as Engine: same micro-batches
        gbs, bls = self.policy.gpu_batch_size, self.policy.block_size
        out = Outputs(rows, n)
        stats = PipelineStats(prompt_tokens=sum(len(input_ids[p]) for p, _ in rows))
        tiers = self.stage_engine.tiers
        moved0 = dict(tiers.bytes_moved)
        tiers.reset_peaks()
        timing, timeline = BlockTiming(), StageTimeline()
        prefill = decode = 0.0
        wave = bls * self.groups
        cpu0, wall0 = time.process_time(), time.perf_counter()  # how much of a core this stage got
        try:
            for w0 in range(0, len(order), wave):
                chunk = order[w0:w0 + wave]
                mbs = [left_padded_micro_batch(chunk[m0:m0 + gbs], rows, input_ids, stop_ids, stop_seqs, max_new,
                                               self.spec.pad_token_id, self.device) for m0 in range(0, len(chunk), gbs)]
                stats.padded_prompt_tokens += sum(mb.ids.numel() for mb in mbs)
                ng = min(self.groups, len(mbs))
                groups = [list(range(len(mbs)))[g * len(mbs) // ng:(g + 1) * len(mbs) // ng] for g in range(ng)]
                P = max(m.prompt_len for m in mbs)
                ws = workspace_nbytes(self.spec, gbs, P, self.dtype.itemsize, gbs * (P if a["prompt_logprobs"] else 1),
                                      widens(self.policy, self.dtype.itemsize, self.device.type == "cpu"))
                tiers.stats["gpu"].reserve(ws, "compute workspace")
                timeline = StageTimeline()
                t0, p0 = time.perf_counter(), timing.prefill
                try:
                    with torch.no_grad():
                        StageRun(self.stage_engine, mbs, groups, max_new, params, a["seed"], a["prompt_logprobs"],
                                 timing, self.ch, self.split, self.rank, timeline).run()
                finally:
                    tiers.stats["gpu"].release(ws)
                t1 = time.perf_counter()
                # time to the wave's first tokens (stage 0's own step-0 units would hide the pipeline fill)
                first = timeline.first_tokens_at if timeline.first_tokens_at is not None else t0 + timing.prefill - p0
                prefill, decode = prefill + first - t0, decode + t1 - first
                stats.blocks += 1
                out.collect(mbs)
                if progress is not None:
                    progress(len(chunk))
            mine = {"stage": self.rank, "layers": [self.split.bounds[self.rank], self.split.bounds[self.rank + 1]],
                    "policy": self.policy.describe(), "io_wait_s": round(timing.io_wait, 6),
                    "totals": timeline.totals(), "units": timeline.units,
                    "cpu_s": round(time.process_time() - cpu0, 6), "wall_s": round(time.perf_counter() - wall0, 6),
                    "bytes_moved": {k: v - moved0.get(k, 0) for k, v in tiers.bytes_moved.items()},
                    "peak_memory_bytes": tiers.peaks()}
            everyone = self.ch.all_gather_json(mine)
        except PipelineError:
            self.broken = True
            raise
        if self.rank != 0:
            return None
        stats.prefill_time, stats.decode_time, stats.io_wait_time = prefill, decode, timing.io_wait
        stats.stages = everyone
        for st in everyone:
            for k, v in st["bytes_moved"].items():
                stats.bytes_moved[k] = stats.bytes_moved.get(k, 0) + v
            for k, v in st["peak_memory_bytes"].items():
                stats.peak_memory_bytes[k] = max(stats.peak_memory_bytes.get(k, 0), v)
        stats.page_cache_fallback_reads = tiers.page_cache_fallback
        return out.result(stats, a["prompt_logprobs"])

    # ---- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Collective on a healthy pipeline: rank 0 tells serving ranks to stop; every rank frees its stage."""
        if self.closed:
            return
        if not self.broken:
            try:
                self.ch.broadcast_json({"op": "close"} if self.rank == 0 else None)
            except PipelineError:
                self.broken = True
        self._release()

    def _release(self) -> None:
        self.closed = True
        self.stage_engine.close()
        if self.owns_group and not self.broken and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __del__(self):
        try:  # never a collective here: just free this stage's memory and offload files
            if not self.closed:
                self.closed = True
                self.stage_engine.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> "DistributedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
