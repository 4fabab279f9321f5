"""Policy fractions -> which bytes live on which tier, and the engine's peak memory per tier.

Every scheduling layer (embedding, each decoder layer, LM head) is stored as one flat byte buffer.
Its first `w_gpu%` bytes stay on the compute tier, the next `w_cpu%` in host memory, the rest on disk,
so the requested split is met to within 4 KB per layer, splitting inside tensors where needed
(FlexGen placed whole tensors by their midpoint, which made GPU memory jump between percentages).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import layers
from .config import Policy
from .model_spec import ModelSpec
from .tiers import ALIGN, align_up

TENSOR_ALIGN = 64  # every tensor starts 64-byte aligned inside its layer buffer (vector loads)
EMBEDDING_ROLES = ("tok_embed", "pos_embed")  # looked up by row, not multiplied


@dataclass(frozen=True)
class Slot:
    """One stored tensor inside a layer buffer. kind: "dense" or "compressed"."""

    role: str  # what layers.py calls it
    name: str  # its checkpoint name
    shape: tuple[int, ...]
    kind: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class LayerLayout:
    slots: tuple[Slot, ...]
    nbytes: int  # stored bytes (compressed where compressed)
    dense_nbytes: int  # bytes of the whole layer in the compute dtype
    dequant_nbytes: int = 0  # compute-dtype bytes of the slots dequantized at each load (not int4pack)

    def segments(self, policy: Policy) -> tuple[int, int, int]:
        """Byte lengths on (gpu, cpu, disk); the disk part starts 4 KB aligned for O_DIRECT."""
        g, c, _ = policy.fractions("w")
        n = self.nbytes
        gb = n if g >= 1.0 else min(n, _round_to(g * n, ALIGN))
        end = n if g + c >= 1.0 else min(n, max(gb, _round_to((g + c) * n, ALIGN)))
        return gb, end - gb, n - end


def _round_to(x: float, a: int) -> int:
    return int(round(x / a)) * a


# Rows per decode matmul up to which torch's fused 4-bit kernel beats dequantize + dense bf16 on a
# CPU with hardware bf16 (AMX / AVX512-BF16). Measured on a 2-core Xeon with AMX (kernel figures of
# the AMX box in reports/benchmarks.md): the fused kernel is 2.5x / 1.8x / 1.0x the dense rate at
# 1 / 4 / 8 rows and 0.5x at 16, but dequantizing every weight each step (0.2-0.5 ns per value, in
# the engine's I/O threads on the same cores) costs more than that half at 16 rows (opt-1.3b in
# memory, batch 16: fused ~0.22 s per decode step, dequantize + dense 0.64 s); from 32 rows dense
# wins, at 256 rows ~5x.
FUSED_INT4_MAX_ROWS_NATIVE_BF16 = 16


def uses_fused_int4(policy: Policy, dtype_bytes: int, cpu_compute: bool) -> bool:
    """Are 4-bit linear weights multiplied without a dequantized copy (else dequantized at load)?
    Only on a CPU compute tier, by compression.fused_int4's kernel: the compiled loop
    (kernels.int4_matmul: fp32, and bf16 without AMX) or torch's fused kernel (bf16 with AMX; in
    fp32 it takes a scalar path, measured 1 GFLOP/s), so fp32 needs the C compiler.
    "auto": always for the compiled loop: it runs up to layers.int4_loop_max_rows rows per call and
    beyond that dequantizes the same slots per call (to fp32, or bf16 where the CPU multiplies it in
    hardware), the work "dequantize" would do at load, so it is never the slower choice. Measured on
    2 AVX2 cores, opt-1.3b fp32 in memory, prompt 16, gen 16: batch 64 15.3-15.5 vs 10.3-12.0 tok/s
    (decode 26.5 vs 14.2-17.8), batch 128 14.5 vs 13.6; bf16 on that box: the loop runs 150 GFLOP/s
    at 16-256 rows. With torch's kernel (AMX): while a decode matmul has at most
    FUSED_INT4_MAX_ROWS_NATIVE_BF16 rows (the prefill's many rows pay the fused rate too, but a
    block's decode steps outnumber it)."""
    if not (cpu_compute and dtype_bytes in (2, 4) and policy.compress_weight):
        return False
    if dtype_bytes == 4:
        from . import kernels
        if not kernels.available():
            return False
    if policy.int4_kernel != "auto":
        return policy.int4_kernel == "fused"
    from . import compression
    from .config import cpu_has_fast_bf16
    if compression.fused_int4(dtype_bytes) is compression.GroupInt4Weight or not cpu_has_fast_bf16():
        return True  # (without a C compiler torch's kernel still beats emulated bf16 at every row count)
    rows = policy.gpu_batch_size * (policy.num_gpu_batches if policy.block_matmul else 1)
    return rows <= FUSED_INT4_MAX_ROWS_NATIVE_BF16


def layer_layout(spec: ModelSpec, j: int, dtype_bytes: int, policy: Policy, cpu_compute: bool = False) -> LayerLayout:
    """Slots of scheduling layer j. 4-bit linear weights multiplied by a fused CPU kernel
    (uses_fused_int4) are never dequantized: stored in the layout of that kernel
    (compression.fused_int4: torch's "int4pack" or the compiled loop's "int4"), where their shape
    allows; other compressed weights are dequantized at load ("compressed")."""
    from . import compression
    slots, off, dense = [], 0, 0
    cfg = policy.comp_weight_config
    fused = compression.fused_int4(dtype_bytes) if uses_fused_int4(policy, dtype_bytes, cpu_compute) else None
    for ref in spec.layer_tensors(j):
        shape = ref.shape
        n = math.prod(shape) * dtype_bytes
        dense += n
        if fused and ref.role.split(".")[0] not in EMBEDDING_ROLES and fused.ok(shape, cfg):
            nb = fused.nbytes(shape, cfg, dtype_bytes)
            slots.append(Slot(ref.role, ref.name, shape, fused.kind, off, nb))
            off = align_up(off + nb, TENSOR_ALIGN)
        elif policy.compress_weight and len(shape) == 2:  # 1-D biases and norms stay dense (tiny)
            nb = compression.compressed_nbytes(shape, cfg)  # [packed | fp16 scales], see compression.to_buffer
            # embedding tables whose rows can be cut out alone are dequantized per looked-up row
            rowwise = ref.role.split(".")[0] in EMBEDDING_ROLES and compression.RowQuantizedTable.ok(shape, cfg)
            slots.append(Slot(ref.role, ref.name, shape, "rows" if rowwise else "compressed", off, nb))
            off = align_up(off + nb, TENSOR_ALIGN)
        else:
            slots.append(Slot(ref.role, ref.name, shape, "dense", off, n))
            off = align_up(off + n, TENSOR_ALIGN)
    deq = sum(math.prod(s.shape) for s in slots if s.kind == "compressed") * dtype_bytes
    return LayerLayout(tuple(slots), off, dense, deq)


def cache_block_nbytes(spec: ModelSpec, rows: int, capacity: int, dtype_bytes: int, policy: Policy) -> int:
    """K and V of one (layer, micro-batch) block with room for `capacity` positions."""
    from .kv_cache import block_nbytes
    cfg = policy.comp_cache_config if policy.compress_cache else None
    return block_nbytes(rows, spec.num_kv_heads, capacity, spec.head_dim, dtype_bytes, cfg)


def cache_block_tiers(spec: ModelSpec, policy: Policy, num_micro_batches: int) -> list[list[str]]:
    """Tier of every (layer, micro-batch) cache block: whole blocks, spread so that every layer gets
    about the same share and the totals match the cache fractions to within one block."""
    g, c, _ = policy.fractions("cache")
    L, K = spec.num_layers, num_micro_batches
    total = L * K
    n_gpu = int(round(g * total))
    n_cpu = int(round((g + c) * total)) - n_gpu
    order = sorted(range(total), key=lambda i: ((i % K) * L + i // K))  # interleave over layers
    tiers = ["disk"] * total
    for rank, i in enumerate(order):
        tiers[i] = "gpu" if rank < n_gpu else ("cpu" if rank < n_gpu + n_cpu else "disk")
    return [[tiers[l * K + k] for k in range(K)] for l in range(L)]


def act_tier(policy: Policy) -> str:
    """The one tier activations live on between layers (the engine requires a single tier)."""
    g, c, d = policy.fractions("act")
    return "gpu" if g >= max(c, d) else ("cpu" if c >= d else "disk")


def widens(policy: Policy, dtype_bytes: int, cpu_compute: bool) -> bool:
    """Whether CPU matmuls may go through layers' fp32 widening (4-bit weights, or bf16 where the CPU
    emulates it). Counted for every 2-byte dtype on the CPU, so the plan holds on any CPU."""
    return cpu_compute and (policy.compress_weight or dtype_bytes == 2)


def widen_nbytes(spec: ModelSpec, rows: int, vocab_rows: int) -> int:
    """Scratch of layers._widened_linear, which matmuls of more rows than the compiled loops take
    (decoder matmuls over `rows` rows, the head over `vocab_rows`) use: the reused fp32 weight block
    of the largest such matrix, and the fp32 input and product of the widest such call (fused q/k/v
    and gate/up). Without a C compiler bf16 widens at every row count; not counted here."""
    h, e, f = spec.hidden, spec.embed_dim, spec.ffn
    mlp_in = 2 * f if spec.mlp == "silu_gated" else f
    limit = min(layers.BF16_LOOP_MAX_ROWS, layers.INT4_LOOP_MAX_ROWS, layers.INT4_X16_LOOP_MAX_ROWS,
                layers.INT4_X16_LOOP_MAX_ROWS_NATIVE)
    calls = []
    if rows > limit:
        calls += [(rows, n, k) for n, k in ((spec.q_width + 2 * spec.kv_width, h), (h, spec.q_width),
                                             (mlp_in, h), (h, f))]
    if vocab_rows > limit:
        calls.append((vocab_rows, spec.vocab_size, e))
    if not calls:
        return 0
    block = max(min(n, max(1, layers.WIDEN_CHUNK // k)) * k for _, n, k in calls)
    return 4 * (block + max(r * (n + k) for r, n, k in calls))


def workspace_nbytes(spec: ModelSpec, rows: int, seq: int, dtype_bytes: int, vocab_rows: int,
                     widen: bool = False) -> int:
    """Compute-tier scratch for one micro-batch step: activations, q/k/v, MLP intermediate,
    attention scores (the math SDPA path can materialise them), fp32 logits, and with `widen` the
    CPU's fp32 widening scratch (widen_nbytes)."""
    h = spec.hidden
    mlp = (2 if spec.mlp == "silu_gated" else 1) * spec.ffn
    acts = rows * seq * (2 * h + 2 * spec.q_width + 2 * spec.kv_width + mlp) * dtype_bytes
    scores = rows * spec.num_heads * seq * seq * 4 if seq > 1 else rows * spec.num_heads * 4 * 2048
    logits = vocab_rows * spec.vocab_size * 4 * 2
    return acts + scores + logits + (widen_nbytes(spec, rows * seq, vocab_rows) if widen else 0)


def step_workspace_nbytes(spec: ModelSpec, policy: Policy, micro_batches: int, prompt_len: int, dtype_bytes: int,
                          prompt_logprobs: bool, cpu_compute: bool = False) -> int:
    """Compute-tier scratch of the larger phase: a prefill micro-batch, or (block-wide matmuls) one
    decode step's rows of every micro-batch at once, LM head logits included."""
    rows = policy.gpu_batch_size
    widen = widens(policy, dtype_bytes, cpu_compute)
    ws = workspace_nbytes(spec, rows, prompt_len, dtype_bytes, rows * (prompt_len if prompt_logprobs else 1), widen)
    if policy.block_matmul and micro_batches > 1:
        ws = max(ws, workspace_nbytes(spec, rows * micro_batches, 1, dtype_bytes, rows * micro_batches, widen))
    return ws


def memory_plan(spec: ModelSpec, policy: Policy, prompt_len: int, gen_len: int, dtype_bytes: int,
                block_rows: int | None = None, device_is_cuda: bool = False,
                prompt_logprobs: bool = False) -> dict[str, int]:
    """Peak bytes per tier ("gpu", "cpu", "disk") the engine holds for this workload.

    The engine reserves exactly these buffers (see Engine/_Scheduler), so the policy search and
    the engine agree on what fits.
    """
    rows = policy.gpu_batch_size
    K = policy.num_gpu_batches
    if block_rows is not None:
        K = min(K, max(1, math.ceil(block_rows / rows)))
    out = {"gpu": 0, "cpu": 0, "disk": 0}
    layouts = [layer_layout(spec, j, dtype_bytes, policy, cpu_compute=not device_is_cuda)
               for j in range(spec.num_layers + 2)]
    max_stored = max_disk = 0
    for lay in layouts:
        gb, cb, db = lay.segments(policy)
        out["gpu"] += gb
        out["cpu"] += cb
        out["disk"] += align_up(db) if db else 0
        max_stored = max(max_stored, lay.nbytes)
        max_disk = max(max_disk, db)
    streamed = policy.w_gpu_percent < 100
    if streamed:  # double-buffered staging of the next layer (+ 4 KB O_DIRECT slack)
        out["gpu"] += 2 * align_up(max_stored + ALIGN)
        if device_is_cuda and max_disk:
            out["cpu"] += 2 * align_up(max_disk + ALIGN)  # pinned bounce for disk -> GPU
    if policy.compress_weight:
        out["gpu"] += 2 * max(l.dequant_nbytes for l in layouts)
    capacity = prompt_len + gen_len
    blk = cache_block_nbytes(spec, rows, capacity, dtype_bytes, policy)
    tiers = cache_block_tiers(spec, policy, K)
    for row in tiers:
        for t in row:
            out[t] += align_up(blk) if t == "disk" else blk
    # decode-time staging (two slots) for blocks attention cannot read in place: see scheduler
    dense_blk = rows * capacity * spec.kv_bytes_per_token(dtype_bytes)
    raw = align_up(blk + ALIGN)
    homes = {t for row in tiers for t in row}
    where = {("cpu" if policy.cpu_cache_compute and t != "gpu" else "gpu") for t in homes
             if policy.compress_cache or t == "disk" or (t == "cpu" and not policy.cpu_cache_compute)}
    for w in where:
        out[w] += 2 * dense_blk
        out["cpu" if device_is_cuda else w] += 2 * raw
    act = act_tier(policy)
    out[act] += K * align_up(rows * prompt_len * spec.hidden * dtype_bytes)
    out["gpu"] += step_workspace_nbytes(spec, policy, K, prompt_len, dtype_bytes, prompt_logprobs,
                                        cpu_compute=not device_is_cuda)
    return out
