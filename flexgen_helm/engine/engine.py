"""`Engine`: load a model of any supported family under a concrete `Policy` and generate. Glue and input checks; the work is
in weight_store (tiers), scheduler (block schedule) and layers (math)."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from .config import ConfigError, MemoryBudget, Policy, default_dtype
from .model_spec import ModelSpec, load_spec
from .placement import act_tier, memory_plan, step_workspace_nbytes
from .rope import Rotary
from .sampling import SamplingParams
from .scheduler import BlockTiming, MicroBatch, run_block
from .tiers import Tiers
from .weight_store import WeightStore
from .weights import CheckpointReader, DummyReader, check_checkpoint, resolve_checkpoint


@dataclass
class GenerationStats:
    prefill_time: float = 0.0
    decode_time: float = 0.0
    io_wait_time: float = 0.0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    generated_tokens: int = 0
    blocks: int = 0
    bytes_moved: dict[str, int] = field(default_factory=dict)
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)
    page_cache_fallback_reads: int = 0
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds by kind of work, prefill + decode


@dataclass
class GenerationResult:
    sequences: list[list[int]]
    logprobs: list[list[float]]
    top_logprobs: list[list[dict[int, float]]]
    prompt_logprobs: list[list[float]] | None
    finish_reasons: list[str]
    stats: GenerationStats


def _check_policy(policy: Policy) -> None:
    g, c, d = policy.fractions("act")
    if max(g, c, d) < 0.999:
        raise ConfigError("activations must live on one tier: set act_gpu_percent or act_cpu_percent to 100")
    if d >= 0.999:
        raise ConfigError("activations on disk are not supported (they move every layer); "
                          "set act_gpu_percent or act_cpu_percent to 100")


def _weights_identity(model_name: str, reader) -> str:
    """What names these weights across processes: `dummy:` weights are a function of the name; a
    checkpoint is its directory plus each weight file's size and modification time."""
    directory = getattr(reader, "directory", None)
    if directory is None:
        return model_name
    files = sorted(os.listdir(directory))
    stats = [(f, st.st_size, st.st_mtime_ns) for f in files
             for st in [os.stat(os.path.join(directory, f))] if os.path.isfile(os.path.join(directory, f))]
    return repr((os.path.realpath(directory), stats))


def left_padded_micro_batch(mrows: list[int], rows: list[tuple[int, int]], input_ids: list[list[int]],
                            stop_ids: list[set[int]], stop_seqs: list, max_new: int, pad_id: int,
                            device: torch.device) -> MicroBatch:
    """The output rows `mrows` as one left-padded micro-batch (positions come from the mask)."""
    prompts = [input_ids[rows[r][0]] for r in mrows]
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P + max(max_new, 1)), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):P] = True
    return MicroBatch(ids.to(device), mask.to(device), list(mrows), [stop_ids[rows[r][0]] for r in mrows],
                      [stop_seqs[rows[r][0]] for r in mrows])


class Outputs:
    """Results per output row (prompt-major, a prompt's completions adjacent), filled block by block."""

    def __init__(self, rows: list[tuple[int, int]], num_prompts: int):
        self.rows = rows
        self.seq: list[list[int]] = [[] for _ in rows]
        self.lp: list[list[float]] = [[] for _ in rows]
        self.top: list[list[dict[int, float]]] = [[] for _ in rows]
        self.reason = ["length"] * len(rows)
        self.prompt_lp: list[list[float] | None] = [None] * num_prompts

    def collect(self, mbs: list[MicroBatch]) -> None:
        for mb in mbs:
            for i, r in enumerate(mb.row_ids):
                self.seq[r], self.lp[r], self.top[r] = mb.tokens[i], mb.logprobs[i], mb.top[i]
                self.reason[r] = "stop" if mb.finished[i] else "length"
                if mb.prompt_logprobs is not None:
                    self.prompt_lp[self.rows[r][0]] = mb.prompt_logprobs[i]

    def result(self, stats: GenerationStats, prompt_logprobs: bool) -> GenerationResult:
        stats.generated_tokens = sum(len(s) for s in self.seq)
        return GenerationResult(self.seq, self.lp, self.top, self.prompt_lp if prompt_logprobs else None,
                                self.reason, stats)


def over_budget(plan: dict[str, int], budget: MemoryBudget) -> tuple[str, int, int] | None:
    """(tier, bytes needed, budget) of the first tier whose memory plan exceeds its budget, or None."""
    for tier, need in plan.items():
        limit = getattr(budget, tier)
        if limit is not None and need > limit:
            return tier, need, limit
    return None


def default_budget(dev: torch.device, budget: MemoryBudget | None) -> MemoryBudget:
    """The given budget; on CUDA without a GPU limit, 90% of the card's memory."""
    budget = budget or MemoryBudget()
    if dev.type == "cuda" and budget.gpu is None:
        budget = MemoryBudget(torch.cuda.get_device_properties(dev).total_memory * 9 // 10, budget.cpu, budget.disk)
    return budget


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA GPU is visible; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda[:i], got {device!r}")
    return dev


class Engine:
    def __init__(self, spec: ModelSpec, policy: Policy, reader, device: torch.device, dtype: torch.dtype,
                 offload_dir: str | None, budget: MemoryBudget, model_name: str, shared_host_weights: bool = False,
                 held: set[int] | None = None):
        """held: the scheduling layers this engine keeps (a pipeline stage's range); default all."""
        self.spec, self.policy, self.device, self.dtype = spec, policy, device, dtype
        self.model_name = model_name
        self.budget = budget
        self._own_dir = tempfile.mkdtemp(prefix="flexgen-", dir=offload_dir) if offload_dir else None
        self.tiers = Tiers(device, self._own_dir, budget.gpu, budget.cpu, budget.disk, pin_memory=policy.pin_weight)
        self.act_home = act_tier(policy)
        self.rotary = Rotary(spec.rope, spec.head_dim) if spec.positions == "rotary" else None
        self.block_counter = 0
        self.closed = False
        try:
            self.weights = WeightStore(spec, policy, self.tiers, reader, dtype,
                                       shared_dir=offload_dir if shared_host_weights else None,
                                       source_id=_weights_identity(model_name, reader) if shared_host_weights else None,
                                       held=held)
        except BaseException:
            self.close()
            raise

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, policy: Policy, device: str = "cpu", dtype: torch.dtype | None = None,
                        offload_dir: str | None = None, budget: MemoryBudget | None = None, prompt_len: int = 512,
                        gen_len: int = 32, shared_host_weights: bool = False, distributed: bool = False,
                        stages: list[int] | None = None, pipeline_groups: int | None = None) -> "Engine":
        """`model`: a checkpoint directory, a hub id, or `dummy:NAME`. `policy` is concrete; the policy
        search ("auto") is resolved one level up, by flexgen_helm.load_engine. Everything is checked
        (device, budget, offload directory, checkpoint names and shapes) before a byte is written.

        shared_host_weights: the host-tier weights are one read-only file in `offload_dir`, mapped by
        every engine on this host with the same weights, placement and dtype (one copy in RAM).
        `distributed=True` (inside torchrun): this rank's pipeline stage, a DistributedEngine."""
        if distributed:  # pipeline stages over torch.distributed: flexgen_helm/distributed/
            from ..distributed.engine import DistributedEngine
            return DistributedEngine.from_pretrained(model, policy, device, dtype, offload_dir, budget, prompt_len,
                                                     gen_len, stages=stages, pipeline_groups=pipeline_groups)
        if not isinstance(policy, Policy):
            raise ConfigError(f"Engine takes a concrete Policy, got {policy!r}; for the policy search use "
                              "flexgen_helm.load_engine(model, policy='auto', ...)")
        dev = resolve_device(device)
        dtype = dtype or getattr(torch, default_dtype(dev.type))
        budget = default_budget(dev, budget)
        spec = load_spec(model)
        if offload_dir is not None and not os.path.isdir(offload_dir):
            raise ConfigError(f"offload directory {offload_dir} does not exist; create it first")
        es = torch.empty(0, dtype=dtype).element_size()
        _check_policy(policy)
        plan = memory_plan(spec, policy, min(prompt_len, spec.max_positions), gen_len, es,
                           device_is_cuda=dev.type == "cuda")
        over = over_budget(plan, budget)
        if over:
            tier, need, limit = over
            raise ConfigError(
                f"policy needs {need / 1e9:.3f} GB on the {tier} tier for prompt {prompt_len} + {gen_len} "
                f"tokens but the budget is {limit / 1e9:.3f} GB; raise it to at least {need / 1e9:.3f} GB, "
                "lower gpu_batch_size/num_gpu_batches, or move weights/cache to a lower tier")
        if shared_host_weights and offload_dir is None:
            raise ConfigError("shared_host_weights keeps one file of host-tier weights in the offload directory: "
                              "pass offload_dir (--offload-dir)")
        if plan["disk"] and offload_dir is None:
            raise ConfigError("the policy puts weights or cache on disk: pass offload_dir (--offload-dir)")
        if model.startswith("dummy:"):
            reader = DummyReader(spec)
        else:  # a hub id is checked against its public shape above, then downloaded and read for real
            path = resolve_checkpoint(model)
            spec = load_spec(path)
            reader = CheckpointReader(path, spec)
            check_checkpoint(reader, spec)
        return cls(spec, policy, reader, dev, dtype, offload_dir, budget, model, shared_host_weights)

    @property
    def max_context(self) -> int:
        return self.spec.max_positions

    # ---- generation ------------------------------------------------------------------------
    def generate(self, input_ids: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, num_completions: int = 1,
                 stop_token_ids: list[int] | list[list[int]] | None = None,
                 stop_sequences: list[list[tuple[int, ...]]] | None = None, top_logprobs: int = 0,
                 prompt_logprobs: bool = False, seed: int = 0, progress=None) -> GenerationResult:
        if self.closed:
            raise ConfigError("this engine is closed")
        n = len(input_ids)
        self._check_inputs(input_ids, max_new_tokens, temperature, top_p, top_k, num_completions, top_logprobs,
                           stop_token_ids, stop_sequences)
        if prompt_logprobs and num_completions > 1 and max_new_tokens == 0:
            num_completions = 1
        stop_ids = self._per_prompt_stops(stop_token_ids, n)
        stop_seqs = [list(map(tuple, s)) for s in stop_sequences] if stop_sequences else [[] for _ in range(n)]
        params = SamplingParams(temperature, top_p, top_k, top_logprobs)
        rows = [(p, c) for p in range(n) for c in range(num_completions)]  # output order: prompt-major
        order = sorted(range(len(rows)), key=lambda r: len(input_ids[rows[r][0]]))  # less padding per micro-batch
        gbs, bls = self.policy.gpu_batch_size, self.policy.block_size
        out = Outputs(rows, n)
        stats = GenerationStats(prompt_tokens=sum(len(input_ids[p]) for p, _ in rows))
        moved0 = dict(self.tiers.bytes_moved)
        dq0 = self.weights.dequant_time
        timing = BlockTiming()
        self.tiers.reset_peaks()
        for b0 in range(0, len(order), bls):
            block = order[b0:b0 + bls]
            mbs = [left_padded_micro_batch(block[m0:m0 + gbs], rows, input_ids, stop_ids, stop_seqs, max_new_tokens,
                                           self.spec.pad_token_id, self.device) for m0 in range(0, len(block), gbs)]
            stats.padded_prompt_tokens += sum(mb.ids.numel() for mb in mbs)
            ws = step_workspace_nbytes(self.spec, self.policy, len(mbs), max(m.prompt_len for m in mbs),
                                       self.dtype.itemsize, prompt_logprobs, cpu_compute=self.device.type == "cpu")
            self.tiers.stats["gpu"].reserve(ws, "compute workspace")
            try:
                with torch.no_grad():  # not inference_mode: I/O threads write these buffers too
                    run_block(self, mbs, max_new_tokens, params, seed, prompt_logprobs, timing)
            finally:
                self.tiers.stats["gpu"].release(ws)
            stats.blocks += 1
            out.collect(mbs)
            if progress is not None:
                progress(len(block))
        stats.prefill_time, stats.decode_time, stats.io_wait_time = timing.prefill, timing.decode, timing.io_wait
        stats.breakdown = {"io_wait": timing.io_wait, "projections_and_mlp": timing.layer_compute - timing.attention,
                           "attention": timing.attention, "head_and_sampling": timing.head,
                           "embedding": timing.embed,
                           "dequantization_in_io_threads": self.weights.dequant_time - dq0}
        stats.bytes_moved = {k: v - moved0.get(k, 0) for k, v in self.tiers.bytes_moved.items()}
        stats.peak_memory_bytes = self.tiers.peaks()
        stats.page_cache_fallback_reads = self.tiers.page_cache_fallback
        return out.result(stats, prompt_logprobs)

    def _check_inputs(self, input_ids, max_new, temperature, top_p, top_k, num_completions, top_logprobs,
                      stop_token_ids, stop_sequences) -> None:
        if not isinstance(input_ids, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in input_ids):
            raise ConfigError("input_ids must be a list of token-id lists")
        if any(len(p) == 0 for p in input_ids):
            raise ConfigError("every prompt needs at least one token (tokenizers that add BOS give one)")
        V = self.spec.vocab_size
        for i, p in enumerate(input_ids):
            if len(p) + max_new > self.spec.max_positions:
                raise ConfigError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new} it exceeds the "
                                  f"model's context of {self.spec.max_positions}; shorten it")
            if min(p) < 0 or max(p) >= V:
                raise ConfigError(f"prompt {i} has token ids outside the vocabulary [0, {V})")
        if max_new < 0 or num_completions < 1 or top_k < 0 or top_logprobs < 0:
            raise ConfigError("max_new_tokens, top_k and top_logprobs must be >= 0 and num_completions >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
        if stop_sequences is not None and len(stop_sequences) != len(input_ids):
            raise ConfigError("stop_sequences needs one list per prompt")
        if stop_token_ids and isinstance(stop_token_ids[0], (list, tuple)) and len(stop_token_ids) != len(input_ids):
            raise ConfigError("per-prompt stop_token_ids needs one list per prompt")

    @staticmethod
    def _per_prompt_stops(stop_token_ids, n: int) -> list[set[int]]:
        if not stop_token_ids:
            return [set() for _ in range(n)]
        if isinstance(stop_token_ids[0], (list, tuple)):
            return [set(s) for s in stop_token_ids]
        return [set(stop_token_ids) for _ in range(n)]

    # ---- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.tiers.close()
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
