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
    io_wait: float = 0.0  # waiting for staged weights or cache prefixes
    layer_compute: float = 0.0  # decoder layers: projections, attention, MLP
    attention: float = 0.0  # of which attention (incl. cache writes and CPU-attention copies)
    head: float = 0.0  # LM head and sampling
    embed: float = 0.0


class _CacheStaging:
    """Two slots (current, next) for blocks whose prefix must be copied to where attention runs."""

    def __init__(self, engine, where: str, rows: int, capacity: int, es: int, cfg):
        spec = engine.spec
        dense, raw = staging_nbytes(rows, spec.num_kv_heads, capacity, spec.head_dim, es, cfg)
        shape = (2, rows, spec.num_kv_heads, capacity, spec.head_dim)
        self.tiers, self.where, self.nbytes = engine.tiers, where, dense + raw
        self.dst = [engine.tiers.alloc(where, dense, "cache staging").view(engine.dtype).view(shape)
                    for _ in range(2)]
        self.raw = [engine.tiers.alloc("cpu" if engine.tiers.on_cuda else where, raw, "cache read buffer",
                                       aligned=True) for _ in range(2)]

    def close(self) -> None:
        for _ in range(2):
            self.tiers.free(self.where, self.dst[0].numel() * self.dst[0].element_size())
            self.tiers.free("cpu" if self.tiers.on_cuda else self.where, self.raw[0].numel())


@dataclass
class _PrefixPipeline:
    """Decode-step cache prefetch: the (layer, micro-batch) pairs whose cached prefix must be staged
    before attention, in the order the schedule consumes them; pair i loads into slot i % 2."""

    order: list[tuple[int, int]]
    futures: dict[tuple[int, int], Future] = field(default_factory=dict)
    slot_of: dict[tuple[int, int], int] = field(default_factory=dict)
    cursor: int = 0  # index in `order` of the next pair to consume


class BlockRun:
    """Generation for one block of micro-batches, filling each MicroBatch's outputs in place.
    Steps: `run` -> `_step` (one token) -> `_layer` (one staged layer, every active micro-batch)
    -> `_embed` / `_decoder` / `_head` (one micro-batch)."""

    def __init__(self, engine, mbs: list[MicroBatch], max_new: int, params: SamplingParams, seed: int,
                 want_prompt_logprobs: bool, timing: BlockTiming):
        self.engine, self.mbs, self.max_new, self.params = engine, mbs, max_new, params
        self.want_prompt_logprobs, self.timing = want_prompt_logprobs, timing
        self.spec, self.tiers, self.store, self.policy = engine.spec, engine.tiers, engine.weights, engine.policy
        self.dev, self.dtype = engine.device, engine.dtype
        self.ccc = self.policy.cpu_cache_compute
        self.overlap = self.policy.overlap  # False: load, then compute, strictly in turn (ablations)
        spec, K = self.spec, len(mbs)
        homes = cache_block_tiers(spec, self.policy, K)
        cfg = self.policy.comp_cache_config if self.policy.compress_cache else None
        self.caches = [[CacheBlock(self.tiers, homes[l][k], mbs[k].rows, spec.num_kv_heads,
                                   mbs[k].prompt_len + max(max_new, 1), spec.head_dim, self.dtype,
                                   f"kv-{engine.block_counter}-{l}-{k}.bin", cfg)
                        for k in range(K)] for l in range(spec.num_layers)]
        engine.block_counter += 1
        self.staging: dict[str, _CacheStaging] = {}
        if max_new > 1:
            es = self.dtype.itemsize
            for where in {self._where(b) for row in self.caches for b in row if self._needs_stage(b)}:
                self.staging[where] = _CacheStaging(engine, where, max(m.rows for m in mbs),
                                                    max(m.prompt_len for m in mbs) + max_new, es, cfg)
        self.gens = {k: row_generators(seed, mb.row_ids) for k, mb in enumerate(mbs)} \
            if params.temperature > 0 else {}
        for mb in mbs:
            n = mb.rows
            mb.tokens, mb.logprobs, mb.top = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
            mb.finished = [False] * n
        self.hidden: list[torch.Tensor | None] = [None] * K  # activations between layers, on act_home
        self.rotary: list = [None] * K  # cos/sin of each micro-batch's new positions this step
        self.pending_layer: Future | None = None

    # ---- placement helpers -------------------------------------------------------------------
    def _where(self, blk: CacheBlock) -> str:
        """The tier attention runs on for this block."""
        return "cpu" if self.ccc and blk.tier != "gpu" else "gpu"

    def _in_place(self, blk: CacheBlock) -> bool:
        """Does decode attention read this compressed block where it lies (no staging)?"""
        return self._where(blk) == blk.tier and blk.attends_in_place(self.spec.num_heads)

    def _needs_stage(self, blk: CacheBlock) -> bool:
        return (blk.staged or self._where(blk) != blk.tier) and not self._in_place(blk)

    def _wait(self, fut: Future):
        t0 = time.perf_counter()
        out = fut.result()
        self.timing.io_wait += time.perf_counter() - t0
        return out

    # ---- the schedule ------------------------------------------------------------------------
    def run(self) -> None:
        self.pending_layer = self.store.submit(0)
        try:
            for step in range(max(self.max_new, 1)):
                t0 = time.perf_counter()
                if not self._step(step):
                    break
                if step == 0:
                    self.timing.prefill += time.perf_counter() - t0
                else:
                    self.timing.decode += time.perf_counter() - t0
                if self.max_new == 0:
                    break
        finally:
            self.close()

    def _step(self, step: int) -> bool:
        """One token for every unfinished micro-batch; False when none is left."""
        active = [k for k, mb in enumerate(self.mbs) if not mb.done]
        if not active:
            return False
        pipe = _PrefixPipeline([(l, k) for l in range(self.spec.num_layers) for k in active
                                if self._needs_stage(self.caches[l][k])] if step else [])
        if self.overlap:
            self._prefetch(pipe, 0, step)
        for j in range(self.spec.num_layers + 2):
            self._layer(j, step, active, pipe)
        return True

    def _layer(self, j: int, step: int, active: list[int], pipe: _PrefixPipeline) -> None:
        nl = self.spec.num_layers + 2
        fut = self.pending_layer if self.pending_layer is not None else self.store.submit(j)
        self.pending_layer = None
        layer = self._wait(fut)
        if layer.ready is not None:
            torch.cuda.current_stream().wait_event(layer.ready)
        last = step == max(self.max_new, 1) - 1 and j == nl - 1
        if self.overlap and not last:
            self.pending_layer = self.store.submit((j + 1) % nl)  # next layer streams in while this one runs
        self._apply(j, step, active, layer.weights, pipe)
        self.store.release(layer.slot)

    def _apply(self, j: int, step: int, active: list[int], w, pipe: _PrefixPipeline) -> None:
        """Scheduling layer j (0: embeddings, 1..L: decoders, L+1: LM head) on the active micro-batches,
        block-wide where the policy allows (decode decoders; the head unless the prefill wants every
        position's logprobs)."""
        L = self.spec.num_layers
        if self.policy.block_matmul and len(active) > 1:
            if 1 <= j <= L and step > 0:
                return self._decoder_block(j - 1, step, active, w, pipe)
            if j == L + 1 and not (step == 0 and self.want_prompt_logprobs):
                return self._head_block(step, active, w)
        for k in active:
            if j == 0:
                self._embed(k, step, w)
            elif j <= L:
                self._decoder(j - 1, k, step, w, pipe)
            else:
                x = _from_home(self.hidden[k], self.engine.act_home, self.dev)
                t0 = time.perf_counter()
                _head(self.engine, w, self.mbs[k], x, step, self.max_new, self.params, self.gens.get(k),
                      self.want_prompt_logprobs)
                self.timing.head += time.perf_counter() - t0

    def _embed(self, k: int, step: int, w) -> None:
        mb = self.mbs[k]
        ids = mb.ids if step == 0 else mb.next_ids
        m = mb.mask[:, :mb.prompt_len + step]
        pos = layers.positions_from_mask(m.long())[:, -ids.shape[1]:]
        t0 = time.perf_counter()
        if self.engine.rotary is not None:
            self.rotary[k] = self.engine.rotary.cos_sin(pos, self.dtype)
        self.hidden[k] = _to_home(layers.embed(w, self.spec, ids, pos), self.engine.act_home)
        self.timing.embed += time.perf_counter() - t0

    def _decoder(self, l: int, k: int, step: int, w, pipe: _PrefixPipeline) -> None:
        x = _from_home(self.hidden[k], self.engine.act_home, self.dev)
        attend = self._attend_for(l, k, step, pipe)  # may wait for the cache prefix: io_wait, not compute
        t0 = time.perf_counter()
        out = layers.decoder_layer(w, self.spec, x, attend, self.rotary[k])
        self.timing.layer_compute += time.perf_counter() - t0
        self.hidden[k] = _to_home(out, self.engine.act_home)

    def _decoder_block(self, l: int, step: int, active: list[int], w, pipe: _PrefixPipeline) -> None:
        """One decoder layer for every active micro-batch with block-wide matmuls: the projections
        and the MLP run once over all micro-batches' rows (a decode step has only gpu_batch_size rows
        per micro-batch, far below the matmul's best rate); attention stays per micro-batch, each
        with its own cache block and prefetch. Beyond FlexGen, which ran every product per micro-batch."""
        spec = self.spec
        xs = [_from_home(self.hidden[k], self.engine.act_home, self.dev) for k in active]
        t0 = time.perf_counter()
        x_all = torch.cat([x.reshape(-1, spec.hidden) for x in xs])
        q, kk, v = layers.qkv(w, spec, x_all)
        outs, r0 = [], 0
        for k, x in zip(active, xs):
            b, t, _ = x.shape
            rows = slice(r0, r0 + b * t)
            t1 = time.perf_counter()
            attend = self._attend_for(l, k, step, pipe)  # may wait for this block's cache prefix
            t0 += time.perf_counter() - t1  # waits are io_wait, not compute
            outs.append(layers.attend_heads(spec, q[rows], kk[rows], v[rows], b, t, attend, self.rotary[k])
                        .reshape(b * t, -1))
            r0 += b * t
        y = layers.finish_layer(w, spec, x_all, torch.cat(outs))
        self.timing.layer_compute += time.perf_counter() - t0
        r0 = 0
        for k, x in zip(active, xs):
            b, t, _ = x.shape
            self.hidden[k] = _to_home(y[r0:r0 + b * t].view(b, t, spec.hidden), self.engine.act_home)
            r0 += b * t

    def _head_block(self, step: int, active: list[int], w) -> None:
        """The LM head once over every active micro-batch's last position (speed: one matmul of
        block rows against the vocab-sized weight instead of one per micro-batch), then each
        micro-batch samples its own rows with its own generators."""
        t0 = time.perf_counter()
        xs = [_from_home(self.hidden[k], self.engine.act_home, self.dev)[:, -1] for k in active]
        logits = layers.lm_head(w, self.spec, torch.cat(xs)[:, None])[:, 0]
        r0 = 0
        for k, x in zip(active, xs):
            _sample(self.mbs[k], logits[r0:r0 + x.shape[0]], step, self.max_new, self.params, self.gens.get(k))
            r0 += x.shape[0]
        self.timing.head += time.perf_counter() - t0

    def _attend_for(self, l: int, k: int, step: int, pipe: _PrefixPipeline):
        """The attention callback of (layer l, micro-batch k) at this step; in decode it first waits
        for the block's cached prefix to be staged (and starts staging the next one)."""
        mb, blk = self.mbs[k], self.caches[l][k]
        window = self.spec.layer_window(l)
        if step == 0:
            return self._timed(_prefill_attend(blk, mb, window))
        staged = None
        if self._needs_stage(blk):
            if not self.overlap:
                self._prefetch(pipe, pipe.cursor, step)
            self._wait(pipe.futures.pop((l, k)))
            staged = self.staging[self._where(blk)].dst[pipe.slot_of[(l, k)]]
            pipe.cursor += 1
            if self.overlap:
                self._prefetch(pipe, pipe.cursor, step)  # next block's prefix loads while this one computes
        return self._timed(_decode_attend(blk, mb, step, staged, self.ccc, self.dev, window, self._in_place(blk)))

    def _timed(self, attend):
        def timed(q, k, v):
            t0 = time.perf_counter()
            out = attend(q, k, v)
            self.timing.attention += time.perf_counter() - t0
            return out
        return timed

    def _prefetch(self, pipe: _PrefixPipeline, i: int, step: int) -> None:
        if i >= len(pipe.order):
            return
        l, k = pipe.order[i]
        pipe.slot_of[(l, k)] = i % 2
        blk = self.caches[l][k]
        st = self.staging[self._where(blk)]
        n_old = self.mbs[k].prompt_len + step - 1
        pipe.futures[(l, k)] = self.tiers.pool.submit(blk.load, n_old, st.raw[i % 2], st.dst[i % 2],
                                                      self._where(blk))

    def close(self) -> None:
        # a load not yet started (queued in the pool, or left for the computing thread) is dropped;
        # one already running finishes first
        if self.pending_layer is not None and not self.pending_layer.cancel():
            self.pending_layer.result()
        self.pending_layer = None
        for row in self.caches:
            for blk in row:
                blk.close()
        for st in self.staging.values():
            st.close()


def run_block(engine, mbs: list[MicroBatch], max_new: int, params: SamplingParams, seed: int,
              want_prompt_logprobs: bool, timing: BlockTiming) -> None:
    """Generate for one block of micro-batches, filling each MicroBatch's outputs in place."""
    BlockRun(engine, mbs, max_new, params, seed, want_prompt_logprobs, timing).run()


def _to_home(x: torch.Tensor, home: str) -> torch.Tensor:
    return x.to("cpu", copy=True) if home == "cpu" else x


def _from_home(x: torch.Tensor, home: str, dev: torch.device) -> torch.Tensor:
    return x.to(dev, copy=True) if home == "cpu" else x


def _prefill_attend(blk: CacheBlock, mb: MicroBatch, window: int | None):
    def attend(q, k, v):
        k, v = blk.write(0, k, v)
        return layers.prefill_attention(q, k, v, mb.mask[:, :mb.prompt_len], window)
    return attend


def _decode_attend(blk: CacheBlock, mb: MicroBatch, step: int, staged, ccc: bool, dev: torch.device,
                   window: int | None, in_place: bool = False):
    n_old = mb.prompt_len + step - 1  # positions already cached; the new token goes at n_old

    def attend(q, k, v):
        on_host = ccc and blk.tier != "gpu"
        if on_host:  # computation delegation: move q/k/v (b*H*d each), not the cache
            q, k, v = q.cpu(), k.cpu(), v.cpu()
            blk.tiers.count("gpu->cpu", (q.numel() + 2 * k.numel()) * q.element_size())
        k, v = blk.write(n_old, k, v)
        if in_place:  # compressed prefix read where it lies (CPU): nothing staged
            allowed = layers.window_mask(mb.mask[:, :n_old + 1], window)
            out = blk.attend_in_place(n_old, q, k, v, allowed)
            return out.to(dev) if on_host else out
        if staged is None:
            k_all, v_all = blk.resident(n_old + 1)
        else:
            st = staged[:, :mb.rows]
            st[0, :, :, n_old:n_old + 1].copy_(k)
            st[1, :, :, n_old:n_old + 1].copy_(v)
            k_all, v_all = st[0, :, :, :n_old + 1], st[1, :, :, :n_old + 1]
        mask = mb.mask[:, :n_old + 1]
        out = layers.decode_attention(q, k_all, v_all, mask.to(q.device), window)
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
    _sample(mb, last, step, max_new, params, gens)


def _sample(mb: MicroBatch, last: torch.Tensor, step: int, max_new: int, params: SamplingParams, gens) -> None:
    """Choose each row's next token from its last-position logits (b, vocab) and record it."""
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
