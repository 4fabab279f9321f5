"""Cost model of one generation block under the engine's schedule, linear in the placement fractions.

One block = `num_gpu_batches` micro-batches of `gpu_batch_size` rows: a prefill step, then
`gen_len - 1` decode steps. Each step walks the scheduling layers (embedding, L decoder layers,
LM head); while layer j computes on every micro-batch, the I/O pool stages layer j+1's weights and
the next micro-batch's cache prefix (scheduler.py). So a layer slot lasts as long as its busiest
resource (overlap = max), and within a resource the work adds up (serial parts = sums):

- compute:  per micro-batch dispatch overhead + matmuls + attention (+ host attention when decode
            attention is delegated to the CPU, + dequantization). When the compute device is the
            CPU, memory copies run on the same cores, so they are added here too.
- weights:  the one pool thread staging layer j+1: copy of its compute-tier part into the staging
            buffer, host part over host->compute, disk part (then host->compute on CUDA), dequant.
- cache:    the pool thread prefetching cache prefixes of blocks that are not where attention runs.
- links:    total bytes over host->compute, and disk reads plus writes, per slot.

Every term is a `Lin` (constant + coefficients on placement variables), so the same expressions
evaluate a given Policy (`estimate`) and become LP constraints (search.py). Variables:
  wg wc wd   weight fractions        cg cc cd   cache fractions      hg hc   activations (0/1)
  s          1 when weights stream (wg < 1); y = wg*s (the compute-tier part copied to staging)
  q          cd*zw: cache blocks on disk while weights stream from disk (their prefix reads share
             the disk queue with the weight requests)
  zw ug uc   indicators (BlockModel.indicators): some weights on disk; cache staging buffers exist
             on the compute tier / on the host
Memory per tier mirrors placement.memory_plan, the engine's own accounting (the search re-checks
its answers with memory_plan itself). Every byte and FLOP of the model is counted by its ModelSpec
(layer_matmul_flops, attention_flops, head_flops, kv_bytes_per_token, ...), so the same model of
time holds for every family: with GQA the KV cache, its moves and its (de)quantization are
kv_heads x head_dim wide, while activations between layers stay hidden wide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..engine.config import CompressionConfig, Policy
from ..engine.model_spec import ModelSpec
from .profiler import HardwareProfile

ALIGN = 4096
CONT_VARS = ("wg", "wc", "wd", "cg", "cc", "cd", "y", "q")
BIN_VARS = ("hg", "s", "zw", "ug", "uc")


class Lin(dict):
    """Linear expression: {variable: coefficient}, the constant under key ""."""

    def __add__(self, other: "Lin | float") -> "Lin":
        out = Lin(self)
        if isinstance(other, Lin):
            for k, v in other.items():
                out[k] = out.get(k, 0.0) + v
        else:
            out[""] = out.get("", 0.0) + float(other)
        return out

    __radd__ = __add__

    def __mul__(self, c: float) -> "Lin":
        return Lin({k: v * c for k, v in self.items()})

    __rmul__ = __mul__

    def value(self, x: dict[str, float]) -> float:
        return sum(v * (1.0 if k == "" else x[k]) for k, v in self.items())


def var(name: str, coef: float = 1.0) -> Lin:
    return Lin({name: coef})


def const(c: float) -> Lin:
    return Lin({"": float(c)})


def _align(n: float) -> float:
    return math.ceil(n / ALIGN) * ALIGN


@dataclass
class Slot:
    """`count` identical layer slots lasting max(resources) each."""

    name: str
    count: float
    resources: dict[str, Lin]


@dataclass
class BlockModel:
    """Time and memory of one block for fixed (gpu_batch_size, num_gpu_batches, flags)."""

    gbs: int
    ngb: int
    cpu_cache_compute: bool
    compress_weight: bool
    compress_cache: bool
    prefill: list[Slot]
    decode: list[Slot]
    serial: Lin  # time outside the slots (the first layer's load)
    memory: dict[str, Lin]
    link_bytes: dict[str, Lin]  # bytes per block over each link, for reports
    cache_blocks: int  # (layer, micro-batch) cache blocks: cache fractions come in 1/cache_blocks steps
    # binary variable -> fractions whose being > 0 forces it to 1 (buffers that exist only then)
    indicators: dict[str, tuple[str, ...]] = field(default_factory=dict)
    int4_kernel: str = "auto"  # Policy.int4_kernel this model was built for

    def time(self, x: dict[str, float]) -> tuple[float, float]:
        """(prefill seconds, decode seconds) of the block at variable values x."""
        def total(slots: list[Slot]) -> float:
            return sum(s.count * max(r.value(x) for r in s.resources.values()) for s in slots)
        return total(self.prefill) + self.serial.value(x), total(self.decode)

    def bottlenecks(self, x: dict[str, float]) -> dict[str, str]:
        return {s.name: max(s.resources, key=lambda k: s.resources[k].value(x))
                for s in self.prefill + self.decode}


@dataclass
class Estimate:
    policy: Policy
    prompt_len: int
    gen_len: int
    prefill_s: float  # one block
    decode_s: float
    memory: dict[str, int]  # peak bytes per tier (engine's memory_plan)
    link_bytes: dict[str, float]
    bottlenecks: dict[str, str] = field(default_factory=dict)

    @property
    def block_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput(self) -> float:
        """Generated tokens per second (FlexGen's headline metric: gen tokens / (prefill + decode))."""
        return self.policy.block_size * self.gen_len / self.block_s

    @property
    def prefill_throughput(self) -> float:
        return self.policy.block_size * self.prompt_len / self.prefill_s

    @property
    def decode_throughput(self) -> float:
        n = self.policy.block_size * max(self.gen_len - 1, 0)
        return n / self.decode_s if self.decode_s > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"policy": self.policy.to_dict(), "prompt_len": self.prompt_len, "gen_len": self.gen_len,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s, "block_s": self.block_s,
                "throughput": self.throughput, "prefill_throughput": self.prefill_throughput,
                "decode_throughput": self.decode_throughput, "memory": self.memory,
                "link_bytes": self.link_bytes, "bottlenecks": self.bottlenecks}


def _weight_sizes(spec: ModelSpec, es: int, pol: Policy, cpu_compute: bool) -> list[tuple[int, int]]:
    """(stored bytes, bytes dequantized per load) of every scheduling layer: embedding, decoders,
    head. 4-bit linear weights in the fused CPU kernel's layout have nothing to dequantize."""
    from ..engine.placement import layer_layout
    out = []
    for j in (0, 1, spec.num_layers + 1):
        lay = layer_layout(spec, j, es, pol, cpu_compute=cpu_compute)
        out.append((lay.nbytes, lay.dequant_nbytes))
    return out


def _cache_block_bytes(spec: ModelSpec, rows: int, capacity: int, es: int, compress: bool,
                       cfg: CompressionConfig) -> int:
    from ..engine.placement import cache_block_nbytes
    return cache_block_nbytes(spec, rows, capacity, es, Policy(compress_cache=compress, comp_cache_config=cfg))


def decode_segments(prompt_len: int, gen_len: int, max_segments: int = 4) -> list[tuple[float, float]]:
    """Decode steps 1..gen_len-1 grouped into <= max_segments runs: (steps, mean cached positions).
    Step i attends to prompt_len + i positions, so costs grow along the block."""
    steps = gen_len - 1
    if steps <= 0:
        return []
    k = min(max_segments, steps)
    out = []
    for i in range(k):
        lo = 1 + steps * i // k
        hi = steps * (i + 1) // k  # inclusive
        n = hi - lo + 1
        out.append((float(n), prompt_len + (lo + hi) / 2.0))
    return out


def contended(compute, disk, sc: float, sd: float):
    """(compute, disk) terms of a stretch of C seconds of compute overlapping D seconds of disk
    reads on a machine where compute keeps a share sc of its rate beside the reads and the disk sd
    of its rate beside compute (profile: compute_share_disk, disk_share_compute): it lasts the
    larger of C + D (1 - sc) / sd and D + C (1 - sd) / sc, not max(C, D). Linear in C and D, so it
    works on seconds and on the LP's Lin terms alike."""
    return compute + disk * ((1.0 - sc) / sd), disk + compute * ((1.0 - sd) / sc)


def build_block_model(spec: ModelSpec, hw: HardwareProfile, gbs: int, ngb: int, prompt_len: int,
                      gen_len: int, dtype_bytes: int, cpu_cache_compute: bool = False,
                      compress_weight: bool = False, compress_cache: bool = False,
                      comp_weight_config: CompressionConfig | None = None,
                      comp_cache_config: CompressionConfig | None = None, block_matmul: bool = True,
                      int4_kernel: str = "auto") -> BlockModel:
    """block_matmul: decode runs each layer's projections and MLP once over all K micro-batches'
    rows (b*K rows per matmul instead of b), as the engine does by default."""
    from ..engine.placement import step_workspace_nbytes

    wcfg = comp_weight_config or Policy().comp_weight_config
    ccfg = comp_cache_config or Policy().comp_cache_config
    es = dtype_bytes
    cuda = hw.device == "cuda"
    h, L, V = spec.hidden, spec.num_layers, spec.vocab_size
    kv_tok = spec.kv_bytes_per_token(es)  # K and V of one position in one layer
    b, K, s, n = gbs, ngb, prompt_len, gen_len
    ccc = cpu_cache_compute
    wpol = Policy(gpu_batch_size=b, num_gpu_batches=K, block_matmul=block_matmul, compress_weight=compress_weight,
                  comp_weight_config=wcfg, int4_kernel=int4_kernel)
    (emb_st, emb_dn), (dec_st, dec_dn), (head_st, head_dn) = _weight_sizes(spec, es, wpol, not cuda)
    # decoder weights in the fused 4-bit CPU layout (nothing dequantized) and a measured rate for it
    fused_int4 = compress_weight and dec_dn == 0 and hw.int4_rate(1) is not None
    W_st = emb_st + L * dec_st + head_st
    max_st = max(emb_st, dec_st, head_st)
    max_dn = max(emb_dn, dec_dn, head_dn)
    capacity = s + max(n, 1)
    blk = _cache_block_bytes(spec, b, capacity, es, compress_cache, ccfg)
    dense_blk = b * capacity * kv_tok
    stored_ratio = blk / dense_blk  # cache bytes stored (and moved) per dense byte
    nblocks = L * K

    # ---- memory per tier (mirrors placement.memory_plan) ------------------------------------
    act = K * _align(b * s * h * es)
    stage_w = 2 * _align(max_st + ALIGN)
    mem = {
        "gpu": var("wg", W_st) + var("s", stage_w) + var("cg", nblocks * blk) + var("hg", act)
        + const(step_workspace_nbytes(spec, Policy(gpu_batch_size=b, num_gpu_batches=K, block_matmul=block_matmul,
                                                   compress_weight=compress_weight),
                                    K, s, es, False, cpu_compute=not cuda) + (2 * max_dn if compress_weight else 0)),
        "cpu": var("wc", W_st) + var("cc", nblocks * blk) + var("hc", act),
        "disk": var("wd", W_st) + var("zw", (L + 2) * ALIGN) + var("cd", nblocks * _align(blk)),
    }
    if cuda:  # pinned bounce buffers for disk -> GPU weight reads
        mem["cpu"] = mem["cpu"] + var("wd", 2 * max_st) + var("zw", 4 * ALIGN)
    # Decode-time cache staging, two slots of (dense prefix + raw read buffer), on the compute tier
    # ("ug") for blocks copied to it, on the host ("uc") for disk blocks attended there.
    # Compressed blocks are always staged (dequantized) where attention runs.
    raw = _align(blk + ALIGN)
    indicators: dict[str, tuple[str, ...]] = {"zw": ("wd",)}
    if ccc:
        indicators["ug"] = ("cg",) if compress_cache else ()
        indicators["uc"] = ("cc", "cd") if compress_cache else ("cd",)
    else:
        indicators["ug"] = ("cg", "cc", "cd") if compress_cache else ("cc", "cd")
        indicators["uc"] = ()
    for ind, where in (("ug", "gpu"), ("uc", "cpu")):
        if indicators[ind]:
            mem[where] = mem[where] + var(ind, 2 * dense_blk)
            raw_tier = "cpu" if cuda else where
            mem[raw_tier] = mem[raw_tier] + var(ind, 2 * raw)

    # ---- helpers: seconds per byte on each path ----------------------------------------------
    h2d, d2h = 1.0 / hw.h2d_bw, 1.0 / hw.d2h_bw
    dev_copy = 1.0 / hw.dev_copy_bw
    rd, wr = 1.0 / hw.disk_read_bw, 1.0 / hw.disk_write_bw
    rd_serial = 1.0 / (hw.disk_read_serial_bw or hw.disk_read_bw)
    # extra seconds per byte of a prefix read while weights stream beside it (profile: measured)
    mixed_extra = max(0.0, 1.0 / hw.disk_read_mixed_bw - rd_serial) if hw.disk_read_mixed_bw else 0.0
    mixed_wait = hw.disk_read_mixed_latency_s  # ... plus the requests queued ahead of it (seconds)
    share = not hw.copy_overlaps_compute  # CPU compute device: copies steal the compute cores
    sc, sd = hw.compute_share_disk, hw.disk_share_compute
    contention = sc < 1.0 or sd < 1.0

    def mm(rows: float, flops: float, prefill: bool) -> float:
        return flops / hw.mm_rate(rows, prefill)

    # ---- weight staging of one layer (pool thread), as Lin in the placement variables ---------
    def weight_chain(stored: int, dense: int) -> tuple[Lin, Lin, Lin, Lin, Lin]:
        """(chain seconds, host->compute bytes, disk read bytes, seconds added to compute, seconds of
        copying done by a CPU core: the compute device's when it is the CPU)."""
        copy_s = var("y", stored * dev_copy) + var("wc", stored * h2d)
        chain = Lin(copy_s) + var("wd", stored * rd)
        link = var("wc", stored)
        if cuda:  # disk -> pinned bounce -> GPU
            chain = chain + var("wd", stored * h2d)
            link = link + var("wd", stored)
        deq = const(dense / hw.dequant_bw) if compress_weight else const(0.0)
        # dequantization runs on the compute device whichever thread issues it
        cores = (copy_s if share else Lin()) + deq
        return chain + deq, link, var("wd", stored), cores, (Lin() if cuda else copy_s)

    wch = {name: weight_chain(st, dn) for name, st, dn in
           (("emb", emb_st, emb_dn), ("dec", dec_st, dec_dn), ("head", head_st, head_dn))}

    # ---- compute of one layer over the K micro-batches ------------------------------------------
    ov = hw.layer_overhead_s
    act_move = lambda t: var("hc", 2 * b * t * h * es * (d2h + h2d) / 2)  # noqa: E731  to host and back

    def dec_compute(prefill: bool, ctx: float) -> dict[str, Lin]:
        """One decoder layer over the K micro-batches: "compute" (seconds on the compute thread,
        with the cache prefetch folded in), "busy" (compute-thread seconds alone, for the core
        count), "copy" (CPU seconds of copies in the I/O threads, CPU compute device), and bytes
        over "h2d", disk "rd" and disk "wr"."""
        t = s if prefill else 1
        rows = b * t
        flops = spec.layer_matmul_flops(rows)
        # block-wide decode: one call of b*K rows per layer; charged here per micro-batch
        call_rows = rows * K if block_matmul and not prefill and K > 1 else rows
        rate = hw.layer_rate(call_rows, spec)  # whole measured layers when the profile has them
        math_s = hw.sched_overhead_s + (flops / rate if rate else ov * rows / call_rows + mm(call_rows, flops, prefill))
        if fused_int4:  # the layer's matmuls run in the fused 4-bit kernel instead of dense bf16
            math_s = max(math_s + flops / hw.int4_rate(call_rows) - mm(call_rows, flops, prefill),
                         flops / hw.int4_rate(call_rows))
        moves = act_move(t) * K
        if prefill:
            # causal: each of the b*s queries sees half the prompt on average
            attn_s = spec.attention_flops(b * s, s / 2) / hw.attn_prefill_flops
            c = const(K * (math_s + hw.attn_prefill_overhead_s + attn_s))
            new = b * s * kv_tok * stored_ratio  # K/V of the prompt, per micro-batch
            if compress_cache:
                c = c + const(K * b * s * kv_tok / hw.quant_bw)
            # host copies happen on the compute stream; disk blocks go through the host then the pool
            c = c + (var("cc", K * new * d2h) + var("cd", K * new * d2h)) + moves
            return {"compute": c, "busy": c, "copy": Lin(), "h2d": Lin(), "rd": Lin(), "wr": var("cd", K * new)}
        # Decode: the cache prefix of (layer, micro-batch) k+1 is fetched while k computes, so each
        # pair lasts max(its compute, its fetch). Blocks sit whole on one tier, so the sum over
        # pairs is linear in the cache fractions: K * sum_tier fraction * max(compute, fetch).
        dense = b * ctx * kv_tok  # K+V attended per micro-batch
        moved = dense * stored_ratio  # what a prefix load moves
        new = b * kv_tok * stored_ratio
        base = math_s + hw.attn_decode_overhead_s
        if compress_cache:  # new entries are quantized (and read back) on the compute thread
            base += b * kv_tok / hw.quant_bw + b * kv_tok / hw.dequant_bw
        # Compressed blocks are dequantized by the fetch (I/O thread) where attention runs: on a
        # CUDA device that is GPU time like any kernel (it adds to compute); on a CPU device it is
        # CPU work beside compute (it adds to the fetch and to the copies competing for cores).
        deq_all = dense / hw.dequant_bw if compress_cache else 0.0
        deq = 0.0 if cuda else deq_all
        dev_attn = dense / hw.attn_decode_bw + (deq_all if cuda else 0.0)
        # q, k, v of the new token to the host; the attention output (q wide) back
        qkv_b = b * (spec.q_width + 2 * spec.kv_width) * es
        host_attn = dense / hw.host_attn_decode_bw + qkv_b * d2h + b * spec.q_width * es * h2d
        cpu = not cuda
        # tier: (compute s, fetch s, CPU copy s in the fetch, host->compute B, disk read B)
        if ccc:
            per = {"cg": (base + dev_attn, deq, deq if cpu else 0.0, 0.0, 0.0),
                   "cc": (base + host_attn + new * d2h, deq, deq, 0.0, 0.0),
                   "cd": (base + host_attn + new * d2h + hw.disk_block_s,
                          moved * (rd_serial + dev_copy) + hw.disk_sync_s + deq, moved * dev_copy + deq,
                          0.0, moved)}
        else:
            per = {"cg": (base + dev_attn, deq, deq if cpu else 0.0, 0.0, 0.0),
                   "cc": (base + dev_attn + new * d2h, moved * h2d + deq,
                          (moved * h2d + deq) if cpu else 0.0, moved, 0.0),
                   "cd": (base + dev_attn + new * d2h + hw.disk_block_s,
                          moved * (rd_serial + h2d) + hw.disk_sync_s + deq,
                          (moved * h2d + deq) if cpu else 0.0, moved, moved)}
        if compress_cache and cpu:
            # a compressed block in memory where attention runs is read in place by one C loop
            # (kv_cache.attends_in_place; the compiled kernels are assumed built): no fetch, and the
            # compute thread reads the prefix about as fast as the dequantization loop writes it
            per["cg"] = (base + deq_all, 0.0, 0.0, 0.0, 0.0)
            if ccc:
                per["cc"] = (base + deq_all + new * d2h, 0.0, 0.0, 0.0, 0.0)
        c, busy, copy, h2d_b, rd_b = moves, moves, Lin(), Lin(), Lin()
        for frac, (comp_s, fetch_s, copy_s, hb, rb) in per.items():
            pair = comp_s + fetch_s if share else max(comp_s, fetch_s)  # share: copies on compute cores
            c = c + var(frac, K * pair)
            if frac == "cd" and (mixed_extra or mixed_wait):
                # while the next layer's weights stream from disk, a prefix read shares the device
                # queue with their requests (q = cd when any weight is on disk, else 0): it waits
                # for those in flight, then gets a share of the rate. Measured in the engine (Zen 4,
                # opt-1.3b, cache and weights on disk): 5.6-7.9 ms per 0.6-2.3 MB prefix, where the
                # share alone priced 0.9-3.5 ms, and validate's predictions for such policies came
                # to 0.70-0.73 of their measured times.
                fetch_m = fetch_s + moved * mixed_extra + mixed_wait
                c = c + var("q", K * ((comp_s + fetch_m if share else max(comp_s, fetch_m)) - pair))
            busy = busy + var(frac, K * comp_s)
            copy = copy + var(frac, K * copy_s)
            h2d_b = h2d_b + var(frac, K * hb)
            rd_b = rd_b + var(frac, K * rb)
        wr_b = var("cd", K * new + K * hw.disk_sync_s * hw.disk_write_bw)
        return {"compute": c, "busy": busy, "copy": copy, "h2d": h2d_b, "rd": rd_b, "wr": wr_b}

    def head_compute(prefill: bool) -> Lin:
        # block-wide: one head matmul over every micro-batch's last position (scheduler._head_block)
        rows = b * K if block_matmul and K > 1 else b
        flops = spec.head_flops(rows)  # last position only
        rate = hw.head_rate(rows, spec)  # measured head + greedy sampling when the profile has it
        if rate:
            t_head = flops / rate
        else:  # sampling reads the fp32 logits a few times (softmax, top-k/argmax)
            t_head = ov * 0.5 + mm(rows, flops, False) + 4 * rows * V * 4 * dev_copy
        return const(K * (t_head * b / rows + hw.sched_overhead_s)) + act_move(1) * K  # per micro-batch share

    def emb_compute(prefill: bool) -> Lin:
        t = s if prefill else 1
        proj = mm(b * t, spec.embed_flops(b * t), prefill) if spec.has_projections else 0.0
        return const(K * (ov * 0.3 + hw.sched_overhead_s + proj + 2 * b * t * h * es * dev_copy))

    def slots_for(prefill: bool, ctx: float, count: float, tag: str) -> list[Slot]:
        dec = dec_compute(prefill, ctx)
        none = {k: Lin() for k in dec}
        out = []
        # (name, slots, layer's own terms, layer whose weights load meanwhile)
        plan = [("emb", 1, dict(none, compute=emb_compute(prefill)), "dec"),
                ("dec", L - 1, dec, "dec"),
                ("dec_last", 1, dec, "head"),
                ("head", 1, dict(none, compute=head_compute(prefill)), "emb")]
        for name, cnt, own, nxt in plan:
            if cnt <= 0:
                continue
            wchain, wh2d, wrd, wcores, wcopy = wch[nxt]
            res = {"compute": own["compute"] + wcores, "weights": wchain}
            if hw.host_cores and not share:
                # copies run beside compute on spare cores, but all the CPU work has to fit on the
                # cores there are (compute uses one per torch thread, each copying I/O thread one)
                threads = hw.meta.get("threads", 1)
                busy = own["busy"] if own["busy"] else own["compute"]
                res["cores"] = (busy * threads + wcopy + own["copy"]) * (1.0 / hw.host_cores)
            link_h2d = wh2d + own["h2d"]
            if link_h2d:
                res["host->compute"] = link_h2d * h2d
            disk = (wrd + own["rd"]) * rd + own["wr"] * wr
            if disk:
                res["disk"] = disk
                if contention:
                    res["compute"], res["disk"] = contended(res["compute"], disk, sc, sd)
            out.append(Slot(f"{tag}:{name}", cnt * count, res))
        return out

    prefill_slots = slots_for(True, float(s), 1.0, "prefill")
    decode_slots: list[Slot] = []
    for steps, ctx in decode_segments(s, n):
        decode_slots += slots_for(False, ctx, steps, f"decode@{ctx:.0f}")
    serial = wch["emb"][0]  # the first layer of the block is loaded before anything can run

    # ---- bytes per block over each link (reporting) ------------------------------------------
    steps = max(n, 1)
    w_h2d = sum((wch[k][1] * c for k, c in (("emb", 1), ("dec", L), ("head", 1))), Lin()) * steps
    w_rd = var("wd", W_st * steps)
    tot_dec = sum(cnt * (ctx - 0) for cnt, ctx in decode_segments(s, n))
    cache_rd_per_pos = b * kv_tok * stored_ratio * L * K
    links = {
        "weights host->compute": w_h2d,
        "weights disk read": w_rd,
        "cache host->compute": (var("cc", 1) + var("cd", 1)) * (0 if ccc else cache_rd_per_pos * tot_dec),
        "cache disk read": var("cd", cache_rd_per_pos * tot_dec),
        "cache disk write": var("cd", cache_rd_per_pos * (s + max(n - 1, 0))),
    }
    return BlockModel(gbs, ngb, ccc, compress_weight, compress_cache, prefill_slots, decode_slots,
                      serial, mem, links, nblocks, indicators, int4_kernel=int4_kernel)


def policy_variables(spec: ModelSpec, policy: Policy, model: BlockModel | None = None) -> dict[str, float]:
    """Variable values of a concrete policy, with the cache split the engine realises (whole blocks)."""
    from ..engine.placement import act_tier
    wg, wc, wd = policy.fractions("w")
    g, c, _ = policy.fractions("cache")
    nb = spec.num_layers * policy.num_gpu_batches  # same rounding as placement.cache_block_tiers
    n_gpu = int(round(g * nb))
    n_cpu = int(round((g + c) * nb)) - n_gpu
    cg, cc, cd = n_gpu / nb, n_cpu / nb, (nb - n_gpu - n_cpu) / nb
    streamed = 1.0 if policy.w_gpu_percent < 100 else 0.0
    hg = 1.0 if act_tier(policy) == "gpu" else 0.0
    x = {"wg": wg, "wc": wc, "wd": wd, "cg": cg, "cc": cc, "cd": cd, "hg": hg, "hc": 1.0 - hg,
         "s": streamed, "y": wg * streamed, "zw": 0.0, "ug": 0.0, "uc": 0.0}
    for ind, fracs in (model.indicators if model else {"zw": ("wd",)}).items():
        x[ind] = 1.0 if any(x[f] > 0 for f in fracs) else 0.0
    x["q"] = cd * x["zw"]  # cache blocks on disk while weights stream from disk
    return x


def model_for_policy(spec: ModelSpec, policy: Policy, hw: HardwareProfile, prompt_len: int, gen_len: int,
                     dtype_bytes: int) -> BlockModel:
    return build_block_model(spec, hw, policy.gpu_batch_size, policy.num_gpu_batches, prompt_len, gen_len,
                             dtype_bytes, policy.cpu_cache_compute, policy.compress_weight,
                             policy.compress_cache, policy.comp_weight_config, policy.comp_cache_config,
                             policy.block_matmul, policy.int4_kernel)


def estimate(spec: ModelSpec, policy: Policy, hw: HardwareProfile, prompt_len: int, gen_len: int,
             dtype_bytes: int, model: BlockModel | None = None, exact_memory: bool = True) -> Estimate:
    """Predicted times of one full block of `policy` and its peak memory per tier (the engine's
    memory_plan, or with exact_memory=False the faster linear mirror used inside the search)."""
    from ..engine.placement import memory_plan
    model = model or model_for_policy(spec, policy, hw, prompt_len, gen_len, dtype_bytes)
    x = policy_variables(spec, policy, model)
    pre, dec = model.time(x)
    if exact_memory:
        mem = memory_plan(spec, policy, prompt_len, gen_len, dtype_bytes, device_is_cuda=hw.device == "cuda")
    else:
        mem = {t: int(math.ceil(e.value(x))) for t, e in model.memory.items()}
    links = {k: v.value(x) for k, v in model.link_bytes.items()}
    return Estimate(policy, prompt_len, gen_len, pre, dec, mem, links, model.bottlenecks(x))
