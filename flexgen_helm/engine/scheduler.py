"""The block schedule (FlexGen's zig-zag): for each generated token, for each layer, for each
micro-batch. A layer's weights are staged once per token and reused by every micro-batch of the
block; while layer j computes, layer j+1's weights and the next micro-batch's cache are being
fetched by the I/O pool, and new cache entries are written back asynchronously. There is no
global barrier per micro-batch: each consumer waits only for the buffer it is about to use.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from . import layers
from .kv_cache import CacheBlock, staging_nbytes
from .placement import cache_block_tiers
from .sampling import SamplingParams, next_tokens, row_generators


@dataclass
class MicroBatch:
    ids: torch.Tensor  # (b, P) left-padded prompt ids
    mask: torch.Tensor  # (b, P + max_new) bool on the compute device: real prompt tokens + generated ones
    row_ids: list[int]  # output rows these rows fill
    stop_ids: list[set[int]]
    stop_seqs: list[list[tuple[int, ...]]]
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    top: list[list[dict[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[list[float]] | None = None
    finished: list[bool] = field(default_factory=list)
    done: bool = False
    next_ids: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.ids.shape[1]


@dataclass
class BlockTiming:
    prefill: float = 0.0
    decode: float = 0.0
    io_wait: float = 0.0


class _CacheStaging:
    """Two slots (current, next) for blocks whose prefix must be copied to where attention runs."""

    def __init__(self, engine, where: str, rows: int, capacity: int, es: int, cfg):
        spec = engine.spec
        dense, raw = staging_nbytes(rows, spec.num_heads, capacity, spec.head_dim, es, cfg)
        shape = (2, rows, spec.num_heads, capacity, spec.head_dim)
        self.tiers, self.where, self.nbytes = engine.tiers, where, dense + raw
        self.dst = [engine.tiers.alloc(where, dense, "cache staging").view(engine.dtype).view(shape)
                    for _ in range(2)]
        self.raw = [engine.tiers.alloc("cpu" if engine.tiers.on_cuda else where, raw, "cache read buffer",
                                       aligned=True) for _ in range(2)]

    def close(self) -> None:
        for _ in range(2):
            self.tiers.free(self.where, self.dst[0].numel() * self.dst[0].element_size())
            self.tiers.free("cpu" if self.tiers.on_cuda else self.where, self.raw[0].numel())


def run_block(engine, mbs: list[MicroBatch], max_new: int, params: SamplingParams, seed: int,
              want_prompt_logprobs: bool, timing: BlockTiming) -> None:
    """Generate for one block of micro-batches, filling each MicroBatch's outputs in place."""
    spec, tiers, store, policy = engine.spec, engine.tiers, engine.weights, engine.policy
    dev, dtype = engine.device, engine.dtype
    L, nl, K = spec.num_layers, spec.num_layers + 2, len(mbs)
    es = torch.empty(0, dtype=dtype).element_size()
    homes = cache_block_tiers(spec, policy, K)
    cfg = policy.comp_cache_config if policy.compress_cache else None
    caches = [[CacheBlock(tiers, homes[l][k], mbs[k].rows, spec.num_heads, mbs[k].prompt_len + max(max_new, 1),
                          spec.head_dim, dtype, f"kv-{engine.block_counter}-{l}-{k}.bin", cfg)
               for k in range(K)] for l in range(L)]
    engine.block_counter += 1
    ccc = policy.cpu_cache_compute

    def where(blk: CacheBlock) -> str:  # the tier attention runs on for this block
        return "cpu" if ccc and blk.tier != "gpu" else "gpu"

    def needs_stage(blk: CacheBlock) -> bool:
        return blk.staged or where(blk) != blk.tier

    staging: dict[str, _CacheStaging] = {}
    if max_new > 1:
        for w_ in {where(b) for row in caches for b in row if needs_stage(b)}:
            staging[w_] = _CacheStaging(engine, w_, max(m.rows for m in mbs),
                                        max(m.prompt_len for m in mbs) + max_new, es, cfg)
    gens = {k: row_generators(seed, mb.row_ids) for k, mb in enumerate(mbs)} if params.temperature > 0 else {}
    for mb in mbs:
        n = mb.rows
        mb.tokens, mb.logprobs, mb.top = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        mb.finished = [False] * n
    hidden: list[torch.Tensor | None] = [None] * K
    act_home = engine.act_home

    def wait(fut: Future):
        t0 = time.perf_counter()
        out = fut.result()
        timing.io_wait += time.perf_counter() - t0
        return out

    steps = max(max_new, 1)
    overlap = policy.overlap  # False: load, then compute, strictly in turn (for ablations)
    wfut: Future | None = store.submit(0)
    try:
        for step in range(steps):
            t_step = time.perf_counter()
            active = [k for k in range(K) if not mbs[k].done]
            if not active:
                break
            # decode-step cache pipeline: order of (layer, micro-batch) pairs needing a staged prefix
            order = [(l, k) for l in range(L) for k in active if needs_stage(caches[l][k])] if step else []
            cfut: dict[tuple[int, int], Future] = {}
            slot_of: dict[tuple[int, int], int] = {}

            def prefetch(i: int) -> None:
                if i < len(order):
                    l, k = order[i]
                    slot_of[(l, k)] = i % 2
                    n_old = mbs[k].prompt_len + step - 1
                    blk = caches[l][k]
                    st = staging[where(blk)]
                    cfut[(l, k)] = tiers.pool.submit(blk.load, n_old, st.raw[i % 2], st.dst[i % 2], where(blk))

            cursor = 0  # index in `order` of the next block to consume
            if overlap:
                prefetch(0)
            for j in range(nl):
                w = wait(wfut if wfut is not None else store.submit(j))
                wfut = None
                if dev.type == "cuda":
                    torch.cuda.current_stream().wait_event(w["__event__"])
                last = step == steps - 1 and j == nl - 1
                if overlap and not last:
                    wfut = store.submit((j + 1) % nl)  # next layer streams in while this one runs
                for k in active:
                    mb = mbs[k]
                    if j == 0:
                        ids = mb.ids if step == 0 else mb.next_ids
                        m = mb.mask[:, :mb.prompt_len + step]
                        pos = layers.positions_from_mask(m.long())[:, -ids.shape[1]:]
                        hidden[k] = layers.embed(w, spec, ids, pos)
                    elif j <= L:
                        x = _from_home(hidden[k], act_home, dev)
                        blk = caches[j - 1][k]
                        if step == 0:
                            attend = _prefill_attend(blk, mb)
                        else:
                            staged = None
                            if needs_stage(blk):
                                if not overlap:
                                    prefetch(cursor)
                                wait(cfut.pop((j - 1, k)))
                                staged = staging[where(blk)].dst[slot_of[(j - 1, k)]]
                                cursor += 1
                                if overlap:
                                    prefetch(cursor)  # next block's prefix loads while this one computes
                            attend = _decode_attend(blk, mb, step, staged, ccc, dev)
                        hidden[k] = _to_home(layers.decoder_layer(w, spec, x, attend), act_home)
                    else:
                        x = _from_home(hidden[k], act_home, dev)
                        _head(engine, w, mb, x, step, max_new, params, gens.get(k), want_prompt_logprobs)
                store.release(w["__slot__"])
            if step == 0:
                timing.prefill += time.perf_counter() - t_step
            else:
                timing.decode += time.perf_counter() - t_step
            if max_new == 0:
                break
    finally:
        if wfut is not None and not wfut.done():
            wfut.result()
        for row in caches:
            for blk in row:
                blk.close()
        for st in staging.values():
            st.close()


def _to_home(x: torch.Tensor, home: str) -> torch.Tensor:
    return x.to("cpu", copy=True) if home == "cpu" else x


def _from_home(x: torch.Tensor, home: str, dev: torch.device) -> torch.Tensor:
    return x.to(dev, copy=True) if home == "cpu" else x


def _prefill_attend(blk: CacheBlock, mb: MicroBatch):
    def attend(q, k, v):
        k, v = blk.write(0, k, v)
        return layers.prefill_attention(q, k, v, mb.mask[:, :mb.prompt_len])
    return attend


def _decode_attend(blk: CacheBlock, mb: MicroBatch, step: int, staged, ccc: bool, dev: torch.device):
    n_old = mb.prompt_len + step - 1  # positions already cached; the new token goes at n_old

    def attend(q, k, v):
        on_host = ccc and blk.tier != "gpu"
        if on_host:  # computation delegation: move q/k/v (b*H*d each), not the cache
            q, k, v = q.cpu(), k.cpu(), v.cpu()
            blk.tiers.count("gpu->cpu", 3 * q.numel() * q.element_size())
        k, v = blk.write(n_old, k, v)
        if staged is None:
            k_all, v_all = blk.resident(n_old + 1)
        else:
            st = staged[:, :mb.rows]
            st[0, :, :, n_old:n_old + 1].copy_(k)
            st[1, :, :, n_old:n_old + 1].copy_(v)
            k_all, v_all = st[0, :, :, :n_old + 1], st[1, :, :, :n_old + 1]
        mask = mb.mask[:, :n_old + 1]
        out = layers.decode_attention(q, k_all, v_all, mask.to(q.device))
        if on_host:
            blk.tiers.count("cpu->gpu", out.numel() * out.element_size())
            out = out.to(dev)
        return out
    return attend


def _head(engine, w, mb: MicroBatch, x: torch.Tensor, step: int, max_new: int, params: SamplingParams,
          gens, want_prompt_logprobs: bool) -> None:
    spec = engine.spec
    if step == 0 and want_prompt_logprobs:
        logits = layers.lm_head(w, spec, x)  # (b, P, V): every position, for echo/perplexity
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, mb.ids[:, 1:, None])[..., 0]
        real = mb.mask[:, :mb.prompt_len].sum(dim=1).tolist()
        mb.prompt_logprobs = [logp[i, mb.prompt_len - int(r):].tolist() for i, r in enumerate(real)]
        last = logits[:, -1]
    else:
        last = layers.lm_head(w, spec, x[:, -1:])[:, 0]
    if max_new == 0:
        mb.done = True
        return
    tokens, chosen, top = next_tokens(last, params, gens)
    tok_list, lp_list = tokens.tolist(), chosen.tolist()
    top_vals = top.values.tolist() if top is not None else None
    top_ids = top.indices.tolist() if top is not None else None
    for i in range(mb.rows):
        if mb.finished[i]:
            continue
        t = tok_list[i]
        mb.tokens[i].append(t)
        mb.logprobs[i].append(lp_list[i])
        mb.top[i].append(dict(zip(top_ids[i], top_vals[i])) if top is not None else {})
        if t in mb.stop_ids[i] or any(tuple(mb.tokens[i][-len(s):]) == s for s in mb.stop_seqs[i] if s):
            mb.finished[i] = True
    mb.next_ids = tokens[:, None]
    col = mb.prompt_len + step
    if col < mb.mask.shape[1]:
        mb.mask[:, col] = True
    if all(mb.finished) or step == max_new - 1:
        mb.done = True
