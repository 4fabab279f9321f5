"""One pipeline stage's part of generating a wave of micro-batch groups.

The wave's micro-batches are split into groups (as many as stages by default, as FlexGen's
dist_flex_opt). A stage runs the block schedule of its own layers over one group at a time
(weights staged once per layer per group, reused by the group's micro-batches) and hands the
group's hidden states to the next stage, so after the pipeline fills every stage works on a
different group, in prefill and in decode. The last stage holds the head: it samples and sends
the new tokens (with logprobs and finish flags) back to the first stage, which embeds them for the
group's next step and keeps the outputs that rank 0 returns.

Per (step, group) unit the stages exchange: stage s -> s+1 a JSON header (`active` micro-batches,
hidden shapes, or `stop`) then one hidden tensor per active micro-batch; last -> first one JSON
`feedback`. The first stage sends `stop` once every micro-batch has finished, after draining the
feedback still in flight, so no message is ever left unread between two generate calls.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from ..engine import layers
from ..engine.kv_cache import CacheBlock
from ..engine.placement import cache_block_tiers
from ..engine.sampling import SamplingParams, row_generators
from ..engine.scheduler import BlockRun, BlockTiming, MicroBatch, _CacheStaging, _PrefixPipeline
from .comm import Channel
from .split import StageSplit


@dataclass
class StageTimeline:
    """Where one stage's wall time went: per (step, group) unit, seconds spent waiting for input
    (hidden states, or tokens fed back), computing, and handing results on."""

    units: list[dict] = field(default_factory=list)
    first_tokens_at: float | None = None  # stage 0: when every group's first token was back

    def add(self, step: int, group: int, t0: float, t1: float, t2: float, t3: float, origin: float) -> None:
        self.units.append({"step": step, "group": group, "start": round(t0 - origin, 6),
                           "wait_s": round(t1 - t0, 6), "busy_s": round(t2 - t1, 6), "send_s": round(t3 - t2, 6)})

    def totals(self) -> dict[str, float]:
        return {k: round(sum(u[k] for u in self.units), 6) for k in ("wait_s", "busy_s", "send_s")}


class StageRun(BlockRun):
    """BlockRun over this stage's layers only; reuses its steps (`_apply`: embeddings, decoders and
    head, block-wide over a group's micro-batches where the policy allows; `_prefetch`) with global
    layer indices."""

    def __init__(self, engine, mbs: list[MicroBatch], groups: list[list[int]], max_new: int,
                 params: SamplingParams, seed: int, want_prompt_logprobs: bool, timing: BlockTiming,
                 channel: Channel, split: StageSplit, stage: int, timeline: StageTimeline):
        self.engine, self.mbs, self.groups, self.max_new, self.params = engine, mbs, groups, max_new, params
        self.want_prompt_logprobs, self.timing, self.timeline = want_prompt_logprobs, timing, timeline
        self.spec, self.tiers, self.store, self.policy = engine.spec, engine.tiers, engine.weights, engine.policy
        self.dev, self.dtype = engine.device, engine.dtype
        self.ccc, self.overlap = self.policy.cpu_cache_compute, self.policy.overlap
        self.ch, self.stage, self.nstages = channel, stage, split.stages
        self.first, self.last = stage == 0, stage == split.stages - 1
        self.decs = split.decoders(stage)
        self.sched = sorted(split.held(stage))
        spec, K = self.spec, len(mbs)
        homes = cache_block_tiers(replace(spec, num_layers=len(self.decs)), self.policy, K)
        cfg = self.policy.comp_cache_config if self.policy.compress_cache else None
        self.caches: list[list[CacheBlock] | None] = [None] * spec.num_layers
        for i, l in enumerate(self.decs):
            self.caches[l] = [CacheBlock(self.tiers, homes[i][k], mbs[k].rows, spec.num_kv_heads,
                                         mbs[k].prompt_len + max(max_new, 1), spec.head_dim, self.dtype,
                                         f"kv-{engine.block_counter}-{l}-{k}.bin", cfg) for k in range(K)]
        engine.block_counter += 1
        self.staging: dict[str, _CacheStaging] = {}
        if max_new > 1:
            wheres = {self._where(b) for l in self.decs for b in self.caches[l] if self._needs_stage(b)}
            for where in wheres:
                self.staging[where] = _CacheStaging(engine, where, max(m.rows for m in mbs),
                                                    max(m.prompt_len for m in mbs) + max_new, self.dtype.itemsize, cfg)
        self.gens = {k: row_generators(seed, mb.row_ids) for k, mb in enumerate(mbs)} \
            if params.temperature > 0 and self.last else {}
        for mb in mbs:
            n = mb.rows
            mb.tokens, mb.logprobs, mb.top = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
            mb.finished = [False] * n
        self.hidden: list[torch.Tensor | None] = [None] * K
        self.rotary: list = [None] * K
        self.pending_layer = None
        self.awaiting: deque[tuple[int, int]] = deque()  # stage 0: (step, group) feedback still to come

    # ---- the schedule ------------------------------------------------------------------------
    def run(self) -> None:
        steps = max(self.max_new, 1)
        origin = time.perf_counter()
        self.pending_layer = self.store.submit(self.sched[0])
        try:
            for step in range(steps):
                for g, ks in enumerate(self.groups):
                    t0 = time.perf_counter()
                    active = self._inputs(step, g, ks)
                    t1 = time.perf_counter()
                    if active is None:
                        return
                    if active:
                        self._compute(step, active, final=step == steps - 1 and g == len(self.groups) - 1)
                    t2 = time.perf_counter()
                    self._outputs(step, g, active)
                    t3 = time.perf_counter()
                    self.timeline.add(step, g, t0, t1, t2, t3, origin)
                    if step == 0:
                        self.timing.prefill += t3 - t0
                    else:
                        self.timing.decode += t3 - t0
            if self.first:
                t0 = time.perf_counter()
                self._drain_feedback()
                self.timing.decode += time.perf_counter() - t0
        finally:
            self.ch.flush()
            self.close()

    def _inputs(self, step: int, g: int, ks: list[int]) -> list[int] | None:
        """The group's active micro-batches once their inputs are here; None: the run is over."""
        if self.first:
            if step > 0 and not self.last:
                self._recv_feedback(expect=(step - 1, g))
            if step > 0 and all(self.mbs[k].done for k in range(len(self.mbs))):
                self._drain_feedback()
                if not self.last:
                    self.ch.send_json({"stop": True}, self.stage + 1)
                return None
            return [k for k in ks if not self.mbs[k].done]
        head = self.ch.recv_json(self.stage - 1)
        if head.get("stop"):
            if not self.last:
                self.ch.send_json(head, self.stage + 1)
            return None
        active = head["active"]
        for k, shape in zip(active, head["shapes"]):
            x = self.ch.recv_tensor(shape, self.dtype, self.stage - 1)
            self.hidden[k] = x.cpu() if self.engine.act_home == "cpu" else x.to(self.dev)
            mb = self.mbs[k]
            t = mb.prompt_len if step == 0 else 1
            if step > 0:
                mb.mask[:, mb.prompt_len + step - 1] = True  # the token the head chose last step
            if self.engine.rotary is not None:
                pos = layers.positions_from_mask(mb.mask[:, :mb.prompt_len + step].long())[:, -t:]
                self.rotary[k] = self.engine.rotary.cos_sin(pos, self.dtype)
        return active

    def _compute(self, step: int, active: list[int], final: bool) -> None:
        pipe = _PrefixPipeline([(l, k) for l in self.decs for k in active
                                if self._needs_stage(self.caches[l][k])] if step else [])
        if self.overlap:
            self._prefetch(pipe, 0, step)
        for i, j in enumerate(self.sched):
            fut = self.pending_layer if self.pending_layer is not None else self.store.submit(j)
            self.pending_layer = None
            layer = self._wait(fut)
            if layer.ready is not None:
                torch.cuda.current_stream().wait_event(layer.ready)
            if self.overlap and not (final and i == len(self.sched) - 1):
                self.pending_layer = self.store.submit(self.sched[(i + 1) % len(self.sched)])
            self._apply(j, step, active, layer.weights, pipe)  # block-wide matmuls as in one process
            self.store.release(layer.slot)

    def _outputs(self, step: int, g: int, active: list[int]) -> None:
        self.ch.reap()
        if not self.last:
            shapes = [list(self.hidden[k].shape) for k in active]
            self.ch.send_json({"active": active, "shapes": shapes}, self.stage + 1)
            for k in active:
                self.ch.send_tensor(self.hidden[k], self.stage + 1)
            if self.first:
                self.awaiting.append((step, g))
        elif not self.first:
            self.ch.send_json({"step": step, "group": g, "mbs": [self._feedback(k, step) for k in active]}, 0)

    # ---- tokens back to the first stage --------------------------------------------------------
    def _feedback(self, k: int, step: int) -> dict:
        mb = self.mbs[k]
        fb = {"k": k, "done": mb.done, "finished": mb.finished,
              "next": mb.next_ids[:, 0].tolist() if mb.next_ids is not None and self.max_new > 0 else None,
              # rows that got a token this step: [row, token, logprob, [[id, logprob], ...]]
              "new": [[i, mb.tokens[i][-1], mb.logprobs[i][-1], [[t, v] for t, v in mb.top[i][-1].items()]]
                      for i in range(mb.rows) if len(mb.tokens[i]) == step + 1]}
        if step == 0 and mb.prompt_logprobs is not None:
            fb["prompt_logprobs"] = mb.prompt_logprobs
        return fb

    def _recv_feedback(self, expect: tuple[int, int]) -> None:
        got = self.awaiting.popleft()
        assert got == expect, (got, expect)
        msg = self.ch.recv_json(self.nstages - 1)
        if (msg["step"], msg["group"]) != expect:
            raise RuntimeError(f"pipeline out of order: got tokens for {msg['step'], msg['group']}, expected {expect}")
        step = msg["step"]
        for fb in msg["mbs"]:
            mb = self.mbs[fb["k"]]
            for i, tok, lp, top in fb["new"]:
                mb.tokens[i].append(tok)
                mb.logprobs[i].append(lp)
                mb.top[i].append({int(t): v for t, v in top})
            mb.finished, mb.done = fb["finished"], fb["done"]
            if "prompt_logprobs" in fb:
                mb.prompt_logprobs = fb["prompt_logprobs"]
            if fb["next"] is not None:
                mb.next_ids = torch.tensor(fb["next"], dtype=torch.long, device=self.dev)[:, None]
                col = mb.prompt_len + step
                if col < mb.mask.shape[1]:
                    mb.mask[:, col] = True
        if step == 0 and expect[1] == len(self.groups) - 1:
            self.timeline.first_tokens_at = time.perf_counter()

    def _drain_feedback(self) -> None:
        while self.awaiting:
            self._recv_feedback(self.awaiting[0])

    def close(self) -> None:
        if self.pending_layer is not None and not self.pending_layer.done():
            self.pending_layer.result()
        self.pending_layer = None
        for l in self.decs:
            for blk in self.caches[l]:
                blk.close()
        for st in self.staging.values():
            st.close()
