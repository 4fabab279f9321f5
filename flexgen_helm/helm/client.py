"""`FlexGenClient`: HELM's `Client` for the offloading engine.

HELM builds clients concurrently and without a lock, once per deployment and per context, so the
engine (possibly tens of GB of weights) lives in a process-wide slot behind a lock, created on
the first cache miss. Every path (stock per-request `helm-run`, the batch runner, `flexgen-helm
run`) goes through `make_batch_request`, so they share one cache-key format, one stop-sequence
rule and one way of building results.
"""
from __future__ import annotations

import atexit
import json
import os
import threading
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

from helm.clients.client import CachingClient
from helm.common.cache import CacheConfig, cache_stats, create_key_value_store
from helm.common.concurrency import ThreadSafeWrapper
from helm.common.hierarchical_logger import hlog
from helm.common.request import ErrorFlags, GeneratedOutput, Request, RequestResult, Token
from helm.proxy.retry import NonRetriableException

from ..engine.config import ConfigError, MemoryBudget, Policy, default_dtype, dtype_name, parse_bytes
from .batching import Batch, GenParams, Item, cut_at_stop, plan_batches
from .cache_check import check_request_cache
from .interrupts import deferred_signals

# ---------------------------------------------------------------------------------------------
# Engine settings and the one engine per process

_OVERRIDES: dict[str, Any] = {}


def set_engine_overrides(**kw: Any) -> None:
    """Settings that win over the deployment's YAML args (used by `flexgen-helm run` flags)."""
    _OVERRIDES.clear()
    _OVERRIDES.update({k: v for k, v in kw.items() if v is not None})


@dataclass(frozen=True)
class EngineSettings:
    model_path: str
    device: str = "auto"  # "auto" = cuda when visible, else cpu
    dtype: str = "auto"  # "auto" = the engine's choice (engine.config.default_dtype)
    policy: str | None = None  # None (fixed default), "auto" (policy search) or a JSON file
    percent: tuple[float, ...] | None = None  # FlexGen's six percentages
    gpu_batch_size: int | None = None
    num_gpu_batches: int | None = None
    gpu_mem: str | None = None
    cpu_mem: str | None = None
    disk_mem: str | None = None
    compress_weight: bool = False
    compress_cache: bool = False
    offload_dir: str | None = None
    # host-tier weights in one read-only file in offload_dir, mapped by every worker of this host
    shared_host_weights: bool = False

    @property
    def budget(self) -> MemoryBudget:
        return MemoryBudget(parse_bytes(self.gpu_mem), parse_bytes(self.cpu_mem), parse_bytes(self.disk_mem))


def _search_available() -> bool:
    try:
        from ..policy import search  # noqa: F401
    except ImportError:
        return False
    return hasattr(search, "auto_policy")


def resolve_policy(s: EngineSettings) -> Policy | str:
    """The policy the engine gets: "auto" when asked for (or when only a budget is given and the
    search exists), else a fixed Policy from --policy FILE / --percent / the default."""
    budgeted = any(x is not None for x in (s.gpu_mem, s.cpu_mem, s.disk_mem))
    fixed = s.policy not in (None, "auto") or s.percent is not None
    if s.policy == "auto" or (budgeted and not fixed and _search_available()):
        if not _search_available():
            raise ConfigError("--policy auto needs the policy search (flexgen_helm.policy.search), which this "
                              "build lacks; pass a fixed policy: --percent W_GPU W_CPU C_GPU C_CPU A_GPU A_CPU "
                              "with --gpu-batch-size/--num-gpu-batches, or --policy FILE.json")
        return "auto"
    kw = {k: v for k, v in (("gpu_batch_size", s.gpu_batch_size), ("num_gpu_batches", s.num_gpu_batches))
          if v is not None}
    if s.policy:
        try:
            with open(s.policy) as f:
                policy = Policy.from_dict({**json.load(f), **kw})
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot read policy file {s.policy}: {e}") from e
    elif s.percent is not None:
        policy = Policy.from_percent(list(s.percent), **kw)
    else:  # everything on the compute device, in blocks of 32 rows
        policy = Policy(**{"gpu_batch_size": 32, "num_gpu_batches": 1, **kw})
    return replace(policy, compress_weight=s.compress_weight or policy.compress_weight,
                   compress_cache=s.compress_cache or policy.compress_cache)


def compression_tag(s: EngineSettings) -> str:
    """Part of the cache key: compression changes outputs, placement and batch sizes do not."""
    p = resolve_policy(s)
    if isinstance(p, str):  # "auto": the search is held to the requested compression
        p = replace(Policy(), compress_weight=s.compress_weight, compress_cache=s.compress_cache)
    tags = [f"{kind}{cfg.num_bits}g{cfg.group_size}" for kind, on, cfg in
            (("w", p.compress_weight, p.comp_weight_config), ("kv", p.compress_cache, p.comp_cache_config)) if on]
    return "+".join(tags) or "none"


def _device_dtype(s: EngineSettings) -> tuple[str, Any]:
    import torch

    device = s.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if s.dtype == "auto":
        return device, None
    return device, getattr(torch, dtype_name(s.dtype))


def group_policy(s: EngineSettings, prompt_len: int, gen_len: int, num_prompts: int) -> Policy:
    """The policy for one group of requests: the fixed one, or the search's pick for this group's
    prompt and generation lengths under the budgets (MMLU's 1 token and XSUM's 64 differ a lot)."""
    policy = resolve_policy(s)
    if not isinstance(policy, str):
        return policy
    from ..engine.model_spec import load_spec
    from ..policy.search import auto_policy

    device, dtype = _device_dtype(s)
    dtype_bytes = 4 if dtype is not None and dtype.itemsize == 4 else 2
    policy = auto_policy(load_spec(s.model_path), prompt_len=prompt_len, gen_len=gen_len, budget=s.budget,
                         device=device, dtype_bytes=dtype_bytes, num_prompts=num_prompts,
                         allow_compression=s.compress_weight or s.compress_cache)
    # the cache key promises exactly the requested compression
    return replace(policy, compress_weight=s.compress_weight, compress_cache=s.compress_cache)


_ENGINE_LOCK = threading.RLock()
_ENGINE: tuple[EngineSettings, Policy, Any] | None = None


def shared_engine(s: EngineSettings, policy: Policy, prompt_len: int, gen_len: int) -> Any:
    """The process's engine for these settings and policy (replacing any other: one per process)."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is not None and _ENGINE[:2] == (s, policy):
            return _ENGINE[2]
        close_engine()
        from ..engine.engine import Engine

        device, dtype = _device_dtype(s)
        if s.offload_dir is not None:
            os.makedirs(s.offload_dir, exist_ok=True)
        hlog(f"flexgen: loading {s.model_path} on {device} with {policy.describe()}")
        from ..distributed.helm_serve import build_engine, world_size
        if world_size() > 1:  # under torchrun: this is stage 0 of a pipeline; the other ranks follow
            engine = build_engine(s.model_path, policy, device, dtype, s.offload_dir, s.budget, prompt_len, gen_len)
        else:
            engine = Engine.from_pretrained(s.model_path, policy=policy, device=device, dtype=dtype,
                                            offload_dir=s.offload_dir, budget=s.budget, prompt_len=prompt_len,
                                            gen_len=gen_len, shared_host_weights=s.shared_host_weights)
        _ENGINE = (s, policy, engine)
        return engine


def close_engine() -> None:
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is not None:
            _ENGINE[2].close()
            _ENGINE = None


atexit.register(close_engine)

# ---------------------------------------------------------------------------------------------
# Tokenizer helpers (HF tokenizer: HELM's own instance when it has one, else the checkpoint's)

_LOCAL_TOKENIZERS: dict[str, ThreadSafeWrapper] = {}
_VOCAB_TEXTS: dict[int, tuple[Any, list[str]]] = {}
_TOK_LOCK = threading.Lock()


def _local_tokenizer(path: str) -> ThreadSafeWrapper:
    with _TOK_LOCK:
        if path not in _LOCAL_TOKENIZERS:
            from transformers import AutoTokenizer
            try:
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
            except OSError as e:
                raise ConfigError(f"no tokenizer found in {path}: put the OPT tokenizer files there or set "
                                  "tokenizer_path in the deployment's client_spec args") from e
            _LOCAL_TOKENIZERS[path] = ThreadSafeWrapper(tok)
        return _LOCAL_TOKENIZERS[path]


def _vocab_texts(tok: Any) -> list[str]:
    """Text of every token id on its own (what HELM shows per token)."""
    hit = _VOCAB_TEXTS.get(id(tok))
    if hit is None or hit[0] is not tok:  # keyed by id, so also check it is the same object
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        hit = (tok, [tok.convert_tokens_to_string([p]) if p is not None else "" for p in pieces])
        _VOCAB_TEXTS[id(tok)] = hit
    return hit[1]


# ---------------------------------------------------------------------------------------------


@dataclass
class BatchReport:
    """What one engine call did; handed to the observer after its results are in the cache."""

    batch_id: str
    group: str
    rows: int
    wall_s: float
    stats: Any  # engine GenerationStats
    policy: dict
    settings: EngineSettings
    # per computed prompt: (request index, rows, prompt tokens over its rows, generated tokens)
    members: list[tuple[int, int, int, int]]


class BatchObserver:
    """Hooks into make_batch_request (progress bars, timing logs); the defaults do nothing."""

    def start(self, rows: int, cached: int) -> None:
        """rows: output rows about to be computed; cached: requests answered from the cache."""

    def rows_done(self, rows: int) -> None:
        """Called by the engine after each block of rows."""

    def batch_done(self, report: BatchReport) -> None:
        """Called once the batch's results are committed to the cache."""


def _error(message: str) -> RequestResult:
    # Not retriable (retrying cannot help) and not fatal (the rest of the run goes on).
    return RequestResult(success=False, cached=False, error=message, completions=[], embedding=[],
                         error_flags=ErrorFlags(is_retriable=False, is_fatal=False))


def _unencodable(text: str) -> str | None:
    """What makes `text` impossible to tokenize (lone surrogates), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"U+{ord(text[e.start]):04X} at character {e.start}"


class FlexGenClient(CachingClient):
    def __init__(self, cache_config: CacheConfig | None, model_path: str, tokenizer: Any = None,
                 tokenizer_name: str | None = None, tokenizer_path: str | None = None,
                 model_name: str | None = None, **engine_args: Any):
        super().__init__(cache_config=cache_config)
        args = {"model_path": model_path, **engine_args, **_OVERRIDES}
        if "percent" in args and args["percent"] is not None:
            args["percent"] = tuple(float(x) for x in args["percent"])
        try:
            self.settings = EngineSettings(**args)
        except TypeError as e:
            raise ConfigError(f"bad client_spec args for the flexgen client: {e}") from e
        self.helm_tokenizer = tokenizer
        self.tokenizer_name = tokenizer_name
        self.tokenizer_path = tokenizer_path
        self.model_name = model_name  # HELM passes the deployment's model: requests for others are refused
        self._spec: Any = None
        self._compression: str | None = None
        self._dtype = ""

    # ---- HELM's per-request entry point ------------------------------------------------------
    def make_request(self, request: Request) -> RequestResult:
        try:
            return self.make_batch_request([request])[0]
        except ConfigError as e:  # the engine cannot be built: every retry would fail the same way
            raise NonRetriableException(str(e)) from e

    # ---- helpers -------------------------------------------------------------------------------
    def _tokenizer(self) -> ThreadSafeWrapper:
        get = getattr(self.helm_tokenizer, "get_wrapped_tokenizer", None)
        if get is not None and self.tokenizer_path is None:
            return get()
        return _local_tokenizer(self.tokenizer_path or self.settings.model_path)

    @property
    def spec(self) -> Any:
        """The model's ModelSpec (config.json only: no weights are read)."""
        if self._spec is None:
            from ..engine.model_spec import load_spec
            self._spec = load_spec(self.settings.model_path)
        return self._spec

    @property
    def max_context(self) -> int:
        return self.spec.max_positions

    def _eos_ids(self, tok: Any) -> set[int]:
        """End-of-text ids: the tokenizer's and every one the model config lists (Llama 3.1: several)."""
        ids = set(self.spec.eos_ids)
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        return ids

    def cache_key(self, r: Request) -> dict:
        if self._compression is None:
            self._compression = compression_tag(self.settings)
            device, dtype = _device_dtype(self.settings)  # "auto" resolved by engine.config.default_dtype
            self._dtype = str(dtype).replace("torch.", "") if dtype else default_dtype(device)
        # what determines the output: the deployment, its weights, their compression and compute dtype,
        # and the request; not the placement policy or batch composition (so shards share entries)
        raw = {"engine": "flexgen-helm", "deployment": r.model_deployment, "model": self.settings.model_path,
               "compression": self._compression, "dtype": self._dtype,
               "prompt": r.prompt, "temperature": r.temperature, "num_completions": r.num_completions,
               "top_p": r.top_p, "max_tokens": r.max_tokens, "stop_sequences": list(r.stop_sequences),
               "top_k_per_token": r.top_k_per_token, "echo_prompt": r.echo_prompt}
        return dict(self.make_cache_key(raw, r))

    def _check(self, r: Request) -> str | None:
        """Why the engine cannot serve r, or None."""
        if self.model_name is not None and r.model != self.model_name:
            return (f"this flexgen client serves {self.model_name} ({self.settings.model_path}), not {r.model}; "
                    "check the request's model_deployment")
        for what, text in [("prompt", r.prompt)] + [("stop sequence", s) for s in r.stop_sequences]:
            bad = _unencodable(text)
            if bad is not None:
                return (f"the {what} is not valid Unicode: {bad}; send UTF-8-encodable text (no lone surrogates, "
                        "e.g. from a JSON \\ud800 escape)")
        if r.embedding or r.messages or r.multimodal_prompt is not None:
            return "the flexgen client serves text completions only (no embeddings, chat messages or media)"
        if r.presence_penalty or r.frequency_penalty:
            return "presence/frequency penalties are not supported by the flexgen client"
        if r.temperature < 0 or not 0 < r.top_p <= 1:
            return f"temperature must be >= 0 and top_p in (0, 1]; got {r.temperature}, {r.top_p}"
        if r.num_completions < 1 or r.max_tokens < 0 or r.top_k_per_token < 0:
            return "num_completions must be >= 1, max_tokens and top_k_per_token >= 0"
        return None

    def _encode(self, tok: Any, prompt: str) -> tuple[list[int], int]:
        """Prompt ids as the family's tokenizer would make them for a base model: with BOS for
        OPT/Llama/Mistral, without for Qwen. Returns (ids, added): `added` is 1 when the BOS was put
        in front here (it is not part of the text HELM sees), 0 when there is none or the text
        already starts with it (HELM's language-modelling prompts start with "</s>" as text)."""
        from ..engine.families import FAMILIES
        ids = tok.encode(prompt, add_special_tokens=False)
        bos = tok.bos_token_id
        if bos is None or not FAMILIES[self.spec.family].add_bos or ids[:1] == [bos]:
            return ids, 0
        return [bos] + ids, 1

    @staticmethod
    def _stops(tok: Any, stops: Sequence[str], texts: list[str]) -> tuple[set[int], list[tuple[int, ...]]]:
        """Token-level early stopping for string stops: every token whose text contains a stop
        string, plus each stop's own encoding. Exactness comes from the string cut afterwards;
        this only saves the decode steps after a stop."""
        ids: set[int] = set()
        seqs: list[tuple[int, ...]] = []
        for s in stops:
            if not s:
                continue
            # a token whose text has U+FFFD is part of a character: its own text says nothing
            ids.update(i for i, t in enumerate(texts) if s in t and "\ufffd" not in t)
            enc = tuple(tok.encode(s, add_special_tokens=False))
            if len(enc) > 1:
                seqs.append(enc)
        return ids, seqs

    # ---- the batch path ------------------------------------------------------------------------
    def make_batch_request(self, requests: Sequence[Request],
                           observer: BatchObserver | None = None) -> list[RequestResult]:
        """Serve many requests: cache hits first, then the misses in length-sorted engine batches,
        each written to the cache as soon as it is done (a killed run loses at most one batch)."""
        n = len(requests)
        # requests the engine cannot serve are answered first: never looked up, never cached
        results: list[RequestResult | None] = [None] * n
        for i, r in enumerate(requests):
            problem = self._check(r)
            if problem:
                results[i] = _error(problem)
        keys = [self.cache_key(r) if results[i] is None else {} for i, r in enumerate(requests)]
        key_strs = [json.dumps(k, sort_keys=True) for k in keys]
        store_cfg = getattr(self.cache, "config", None)
        if store_cfg is not None:
            check_request_cache(store_cfg)
            with create_key_value_store(store_cfg) as store:
                for i, k in enumerate(keys):
                    if results[i] is not None:
                        continue
                    cache_stats.increment_query(store_cfg.cache_stats_key)
                    resp = store.get(k)
                    if resp:
                        results[i] = self._result(resp, cached=True)
        todo: dict[str, list[int]] = {}  # identical requests are computed once
        for i, r in enumerate(requests):
            if results[i] is not None:
                continue
            if r.max_tokens == 0 and not r.echo_prompt:
                empty = GeneratedOutput(text="", logprob=0.0, tokens=[], finish_reason={"reason": "length"})
                results[i] = RequestResult(success=True, cached=False, completions=[empty] * r.num_completions,
                                           embedding=[], request_time=0.0)
            else:
                todo.setdefault(key_strs[i], []).append(i)
        if not todo:
            return results  # type: ignore[return-value]

        with self._tokenizer() as tok:
            items = self._items(tok, requests, todo, results)
        obs = observer or BatchObserver()
        obs.start(sum(it.params.rows_per_prompt for it in items),
                  sum(r is not None and r.cached for r in results))
        if not items:
            return results  # type: ignore[return-value]
        for policy, prompt_len, gen_len, batches in self._plan(items):
            engine = shared_engine(self.settings, policy, prompt_len, gen_len)
            for batch in batches:
                self._run_batch(engine, batch, requests, keys, todo, results, store_cfg, obs)
        return results  # type: ignore[return-value]

    def _plan(self, items: list[Item]) -> list[tuple[Policy, int, int, list[Batch]]]:
        """(policy, prompt_len, gen_len, batches) per engine, each policy used once: groups of equal
        generation parameters, a policy per group, groups sharing a policy run back to back."""
        groups: dict[GenParams, list[Item]] = {}
        for it in items:
            groups.setdefault(it.params, []).append(it)
        fixed = not isinstance(resolve_policy(self.settings), str)
        all_len = max(len(it.ids) for it in items), max(it.params.max_tokens for it in items)
        plans: dict[Policy, list] = {}
        for params, members in groups.items():
            lens = all_len if fixed else (max(len(it.ids) for it in members), params.max_tokens)
            policy = group_policy(self.settings, lens[0], lens[1], len(members))
            plan = plans.setdefault(policy, [policy, 0, 0, []])
            plan[1], plan[2] = max(plan[1], lens[0]), max(plan[2], lens[1])
            plan[3] += plan_batches(members, policy.block_size)
        return [tuple(p) for p in plans.values()]  # type: ignore[misc]

    def _run_batch(self, engine: Any, batch: Batch, requests: Sequence[Request], keys: list[dict],
                   todo: dict[str, list[int]], results: list[RequestResult | None], store_cfg: Any,
                   obs: BatchObserver) -> None:
        with self._tokenizer() as tok:
            stops = self._stop_args(tok, batch.params.stop_sequences)
        with _ENGINE_LOCK:  # time the work, not the wait for HELM's other threads
            t0 = time.time()
            res = self._generate(engine, batch, stops, obs.rows_done)
            wall = time.time() - t0
        with self._tokenizer() as tok:
            responses = self._responses(tok, batch, requests, res, wall, t0)
        members = []
        for j, (it, resp) in enumerate(zip(batch.items, responses)):
            for i in todo[it.key]:
                results[i] = self._result(resp, cached=False)
            per = len(res.sequences) // len(batch.items)
            rows = range(j * per, (j + 1) * per)
            members.append((it.index, per, len(it.ids) * per, sum(len(res.sequences[r]) for r in rows)))
        with deferred_signals():  # the batch's cache entries and its timing line: all or nothing
            if store_cfg is not None:
                with create_key_value_store(store_cfg) as store:
                    for it, resp in zip(batch.items, responses):
                        cache_stats.increment_compute(store_cfg.cache_stats_key)
                        store.put(keys[it.index], resp)
            obs.batch_done(BatchReport(batch.batch_id, batch.params.label(), batch.rows, wall, res.stats,
                                       asdict(engine.policy), self.settings, members))

    def _items(self, tok: Any, requests: Sequence[Request], todo: dict[str, list[int]],
               results: list[RequestResult | None]) -> list[Item]:
        """Encode the prompts to compute; a prompt that cannot fit gets its error result here."""
        items: list[Item] = []
        for key_str, idx in todo.items():
            r = requests[idx[0]]
            ids, _ = self._encode(tok, r.prompt)
            if ids and max(ids) >= self.spec.vocab_size:
                msg = (f"the tokenizer gives token id {max(ids)} but the model has {self.spec.vocab_size} embeddings; "
                       "the deployment's tokenizer does not belong to this checkpoint")
                for i in idx:
                    results[i] = _error(msg)
                continue
            if len(ids) + r.max_tokens > self.max_context:
                msg = (f"prompt too long for the model's context of {self.max_context} tokens ({len(ids)} prompt "
                       f"tokens + max_tokens={r.max_tokens}); shorten the prompt or set the deployment's "
                       "max_sequence_length (prod_env/model_deployments.yaml) so HELM truncates it")
                for i in idx:
                    results[i] = _error(msg)
                continue
            items.append(Item(idx[0], ids, GenParams.from_request(r), key_str))
        return items

    def _stop_args(self, tok: Any, stops: Sequence[str]) -> tuple[list[int], list[tuple[int, ...]]]:
        ids, seqs = self._stops(tok, stops, _vocab_texts(tok))
        return sorted(ids | self._eos_ids(tok)), seqs

    @staticmethod
    def _generate(engine: Any, batch: Batch, stops: tuple[list[int], list[tuple[int, ...]]],
                  on_rows: Callable[[int], None] | None) -> Any:
        p, m = batch.params, len(batch.items)
        return engine.generate(
            [it.ids for it in batch.items], max_new_tokens=p.max_tokens, temperature=p.temperature,
            top_p=p.top_p, num_completions=p.rows_per_prompt, stop_token_ids=[stops[0]] * m,
            stop_sequences=[stops[1]] * m,
            # more alternatives than the vocabulary has: all of them
            top_logprobs=min(p.top_k_per_token, engine.spec.vocab_size) if p.top_k_per_token > 1 else 0,
            prompt_logprobs=p.echo_prompt, seed=zlib.crc32(batch.batch_id.encode()), progress=on_rows)

    def _responses(self, tok: Any, batch: Batch, requests: Sequence[Request], res: Any, wall: float,
                   t0: float) -> list[dict]:
        """Engine output -> HELM-cacheable dicts, cut at the first stop string."""
        texts = _vocab_texts(tok)
        p = batch.params
        eos = self._eos_ids(tok)

        def decode(ids: Sequence[int]) -> str:
            return tok.decode(list(ids), clean_up_tokenization_spaces=False)
        out = []
        for j, it in enumerate(batch.items):
            prompt = requests[it.index].prompt
            echo: tuple[list[str], list[float]] = ([], [])
            if p.echo_prompt:
                _, added = self._encode(tok, prompt)
                plp = list(res.prompt_logprobs[j] or [])
                # every token of the text is echoed; the first one of the sequence has no logprob
                echo = ([texts[t] for t in it.ids[added:]], ([] if added else [0.0]) + plp)
            completions = []
            per = len(res.sequences) // len(batch.items)  # 1 when greedy or scoring only: copies
            for c in range(p.num_completions):
                row = j * per + min(c, per - 1)
                seq, lps = list(res.sequences[row]), list(res.logprobs[row])
                tops = list(res.top_logprobs[row]) if res.top_logprobs else []
                reason = "length"
                if seq and seq[-1] in eos:
                    seq, lps, tops, reason = seq[:-1], lps[:-1], tops[:-1], "stop"
                tok_texts = [texts[t] if t < len(texts) else "" for t in seq]
                k, text, stopped = cut_at_stop(decode, seq, p.stop_sequences)
                if stopped or res.finish_reasons[row] == "stop":
                    reason = "stop"
                top_k = [[[texts[i] if i < len(texts) else "", lp] for i, lp in d.items()] for d in tops[:k]]
                completions.append({
                    "text": (prompt + text) if p.echo_prompt else text,
                    "tokens": echo[0] + tok_texts[:k], "logprobs": echo[1] + lps[:k],
                    "top_logprobs": [[] for _ in echo[0]] + top_k, "finish_reason": reason})
            out.append({"completions": completions, "batch_size": len(batch.items), "batch_request_time": wall,
                        "request_time": wall, "request_datetime": int(t0)})
        return out

    @staticmethod
    def _result(resp: dict, cached: bool) -> RequestResult:
        completions = [
            GeneratedOutput(text=c["text"], logprob=float(sum(c["logprobs"])),
                            tokens=[Token(text=t, logprob=lp) for t, lp in zip(c["tokens"], c["logprobs"])],
                            finish_reason={"reason": c["finish_reason"]})
            for c in resp["completions"]]
        return RequestResult(success=True, cached=cached, completions=completions, embedding=[],
                             request_time=resp.get("request_time"), request_datetime=resp.get("request_datetime"),
                             batch_size=resp.get("batch_size"), batch_request_time=resp.get("batch_request_time"))
