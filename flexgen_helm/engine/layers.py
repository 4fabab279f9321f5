"""One decoder block for every family, as plain functions of (weights, activations, attention
callback), parameterized by `ModelSpec`. Shapes: b rows, t new tokens, h hidden, H query heads,
G key/value heads (G divides H), d head dim, n keys attended.

`w` maps a layer's tensor roles ("q.weight", "gate.weight", "attn_norm.weight", ...; see
ModelSpec.layer_tensors) to tensors on the compute device, already dequantized.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from . import kernels
from .compression import FUSED_INT4_TYPES, GroupInt4Weight, RowQuantizedTable
from .config import cpu_has_amx, cpu_has_fast_bf16
from .model_spec import ModelSpec
from .rope import apply_rotary

Weights = dict[str, torch.Tensor]
# attend(q, k, v): q (b, H, t, d), k/v (b, G, t, d) for the new tokens, RoPE applied -> (b, H, t, d)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CosSin = tuple[torch.Tensor, torch.Tensor]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions with left padding: real tokens count 0, 1, 2...; pads get -1."""
    return torch.cumsum(mask, dim=1) * mask - 1


def norm(w: Weights, role: str, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if spec.norm == "rms":  # in fp32 like the reference, then the weight in the compute dtype
        y = kernels.rms_norm(x, w[role + ".weight"], spec.norm_eps)  # speed: a decode step's rows, one pass
        if y is not None:
            return y
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=spec.norm_eps).to(x.dtype)
        return y * w[role + ".weight"]
    if spec.norm_affine:
        return F.layer_norm(x, (x.shape[-1],), w[role + ".weight"], w[role + ".bias"], spec.norm_eps)
    return F.layer_norm(x, (x.shape[-1],), eps=spec.norm_eps)


def _linear(w: Weights, role: str, x: torch.Tensor) -> torch.Tensor:
    return linear(x, w[role + ".weight"], w.get(role + ".bias"))


# Rows up to which the compiled bf16 loop beats widening the weight (into a reused buffer) for
# torch's fp32 matmul, where bf16 is emulated. Measured on 2 Zen 3 cores (AVX2), 8192 x 2048 weights
# cycled from memory, GFLOP/s loop vs widened: 16 rows 81 vs 35, 32: 81 vs 61, 48: 79 vs 76,
# 64: 74 vs 86, 128: 67 vs 107, 1024: 65 vs 160 (torch's bf16: 22 at every row count). Fixed, not
# probed per process, so a run's results do not depend on timing noise. With weight rows in L2
# blocks (tenth session, alternating in one run): 48 rows 112 vs 62, 64: 111 vs 73, 96: 111 vs 85,
# 128: 112 vs 97, 256: 112 vs 122; the sixth session's faster hour widened to 107 at 128 rows.
BF16_LOOP_MAX_ROWS = 96
# Where the CPU has AVX512-BF16 without AMX, rows up to which the compiled loop beats torch's bf16
# matmul: its vdpbf16ps loop (kernels.bf16_dp). 2 Zen 4 cores (AVX512-BF16, no AMX), weights cycled
# from memory, GFLOP/s torch vs loop, 8192 x 2048: 1 row 15-20 vs 28-59, 4: 77-82 vs 92-128, 16: 203-213
# vs 240-247, 32: 278-299 vs 302-310, 48: 335-339 vs 332-334; 2048 x 2048 at 32 rows 251-293 vs 265-293.
# Builds without that loop (a compiler without AVX512-BF16) widen in registers: one row only
# (18 vs 36 GFLOP/s; 4 rows 73 vs 59).
BF16_DP_MAX_ROWS_NATIVE = 32
BF16_LOOP_MAX_ROWS_NATIVE = 1
# Rows up to which the compiled 4-bit loop (GroupInt4Weight) beats dequantizing the weight to fp32
# (compiled, ~0.15 ns per value, into the reused buffer) for torch's fp32 matmul. Same box and
# weights, GFLOP/s loop vs dequantized: 16 rows 93 vs 36, 48: 89 vs 76, 64: 80 vs 87, 96: 69 vs 100,
# 256: 67 vs 140 (reports/bench/n0_kernels_avx2.json). With weight rows in L2 blocks (tenth session,
# fast hour, alternating): 48 rows 126 vs 74, 64: 126 vs 85, 96: 124 vs 104, 128: 124 vs 117, 192:
# 123 vs 131.
INT4_LOOP_MAX_ROWS = 96
# The same for bf16 activations, which take the 16-bit fixed-point loop (kernels.int4_matmul): it ran
# 1.3x the fp32 loop and, against dequantizing, GFLOP/s loop vs dequantized at 64 rows 94 vs 39, 96:
# 98 vs 50, 128: 96 vs 50, 256: 96 vs 79, 512: 101 vs 90 (2 Zen 3 cores, 8192 x 2048, alternating in
# one run, in an hour when fp32 matmuls ran ~0.6x their best here); in a fast hour 64: 146 vs 70,
# 128: 148 vs 98, 256: 149 vs 122 (1.22x at 256 rows in both).
INT4_X16_LOOP_MAX_ROWS = 256
# The same where the CPU multiplies bf16 in hardware: beyond these rows dequantizing to bf16 (compiled,
# ~0.23 ns per value) for torch's bf16 matmul wins. 2 Zen 4 cores (AVX512-BF16, no AMX), 8192 x 2048
# cycled from memory, GFLOP/s loop vs dequantized: 16 rows 167 vs 87, 32: 172 vs 148, 48: 191 vs
# 190, 64: 191 vs 220, 128: 175 vs 294, 256: 170 vs 359 (dequantized to fp32 for fp32's matmul: 147).
INT4_X16_LOOP_MAX_ROWS_NATIVE = 48


# Where kernels.int4_dq_min_rows (AVX512-BF16 builds), int4_matmul multiplies several bf16 rows
# through bf16 blocks of the weight, at about dense bf16's rate up to a few hundred rows. layers.linear
# on 2 Zen 4 cores, GFLOP/s it vs dequantizing the whole weight for torch's matmul (8192 x 2048 /
# 2048 x 8192): 64 rows 370 vs 220 / 355 vs 201, 128: 391 vs 297 / 378 vs 274, 256: 391 vs 359 /
# 406 vs 343, 1024: 376 vs 401 / 405 vs 399, 4096: 384 vs 408 / 407 vs 414.
INT4_DQ_MAX_ROWS = 512


def int4_loop_max_rows(dtype: torch.dtype) -> int:
    """Rows up to which layers.linear multiplies a GroupInt4Weight by kernels.int4_matmul; beyond,
    it dequantizes the weight for torch's matmul."""
    if dtype != torch.bfloat16:
        return INT4_LOOP_MAX_ROWS
    if bf16_emulated():
        return INT4_X16_LOOP_MAX_ROWS
    return INT4_DQ_MAX_ROWS if kernels.int4_dq_min_rows() else INT4_X16_LOOP_MAX_ROWS_NATIVE


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ weight.T + bias, by the fastest kernel this device has for the weight's form:
    the one place the engine (and the profiler, which prices it) chooses a matmul."""
    if isinstance(weight, FUSED_INT4_TYPES):  # 4-bit weights on the CPU: fused kernel where rows are few
        rows = x.numel() // max(1, x.shape[-1])
        if isinstance(weight, GroupInt4Weight) and rows > int4_loop_max_rows(x.dtype) and kernels.available():
            # Speed: many rows (a prefill) are compute-bound, and the 4-bit loop tops out below
            # torch's dense matmul; dequantizing (compiled, ~0.2 ns per weight) costs less than it
            # saves. To bf16 where the CPU multiplies it in hardware (2.4x fp32's rate at 256 rows
            # on Zen 4), else to fp32.
            dt = torch.float32 if x.dtype != torch.bfloat16 or bf16_emulated() else torch.bfloat16
            y = _widened_linear(x, weight.shape, weight.dequantize_rows_into, dt).to(x.dtype)
        else:
            y = weight.matmul(x)
        return y.add_(bias) if bias is not None else y
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and bf16_emulated():
        # Speed: torch emulates bf16 matmuls here (~10 GFLOP/s per core). bf16 widens to fp32
        # exactly, so both paths below equal a bf16 matmul with fp32 accumulation, 3-7x faster.
        y = kernels.bf16_matmul(weight, x, BF16_LOOP_MAX_ROWS)
        if y is None:  # many rows: widen the weight, torch's fp32 matmul
            y = _widened_linear(x, weight.shape, lambda a, b, out: out.copy_(weight[a:b])).to(x.dtype)
        return y.add_(bias) if bias is not None else y
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not cpu_amx():
        # Speed: with AVX512-BF16, torch's kernel reaches its best rate only from ~48 rows, and reads
        # a one-row product's weight at half memory speed; the loop (same fp32 accumulation) runs
        # 1.5-1.9x it at one row and 1.0-1.45x up to 32 rows (a decode step's). None beyond its
        # rows. (AMX boxes keep torch's kernel: not measured against the loop.)
        dp = x.dtype == torch.bfloat16 and kernels.bf16_dp()
        y = kernels.bf16_matmul(weight, x, BF16_DP_MAX_ROWS_NATIVE if dp else BF16_LOOP_MAX_ROWS_NATIVE)
        if y is not None:
            return y.add_(bias) if bias is not None else y
    return F.linear(x, weight, bias)


_scratch = threading.local()
WIDEN_CHUNK = 1 << 24  # values: the fp32 scratch stays <= 64 MB (a 128K-vocab head is 1 GB in fp32)


def _widened_linear(x: torch.Tensor, shape: tuple[int, int], fill: Callable[[int, int, torch.Tensor], object],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ w.T in `dtype` (fp32, or bf16 on CPUs that multiply it in hardware) for an (n, k) weight
    held in another form: fill(a, b, out) writes its rows [a, b) in `dtype` into `out` (b - a, k), a
    block of rows at a time, into a scratch buffer reused across calls (per thread and dtype).
    Speed: a fresh fp32 copy per call pays its page faults every time; reused, an 8192 x 2048 bf16
    product runs 100 instead of 68 GFLOP/s at 128 rows, 134 instead of 100 at 256."""
    n, k = shape
    step = max(1, WIDEN_CHUNK // k)
    name = str(dtype)  # one scratch per dtype
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < min(n, step) * k:
        buf = torch.empty(min(n, step) * k, dtype=dtype)
        setattr(_scratch, name, buf)
    xf = x.to(dtype)
    if n <= step:
        w = buf[:n * k].view(n, k)
        fill(0, n, w)
        return F.linear(xf, w)
    y = torch.empty(*x.shape[:-1], n, dtype=dtype)
    for a in range(0, n, step):
        b = min(n, a + step)
        w = buf[:(b - a) * k].view(b - a, k)
        fill(a, b, w)
        y[..., a:b] = F.linear(xf, w)
    return y


@functools.lru_cache(maxsize=1)
def bf16_emulated() -> bool:
    return not cpu_has_fast_bf16()


@functools.lru_cache(maxsize=1)
def cpu_amx() -> bool:
    return cpu_has_amx()


def embed(w: Weights, spec: ModelSpec, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ids, positions: (b, t) -> (b, t, h). Learned positions are looked up here; rotary ones are
    applied inside attention."""
    x = _lookup(w["tok_embed.weight"], ids)
    if spec.has_projections:
        x = _linear(w, "project_in", x)
    if spec.positions == "learned":
        x = x + _lookup(w["pos_embed.weight"], positions + spec.position_offset)
    return x


def _lookup(table, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(table, RowQuantizedTable):  # 4-bit table: only the rows asked for are dequantized
        return table.lookup(ids)
    return F.embedding(ids, table)


def _mlp(w: Weights, spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.mlp == "silu_gated":
        if "gate_up.weight" in w:  # one matmul for both (stored contiguously)
            gate, up = _linear(w, "gate_up", x).chunk(2, dim=-1)
            return _linear(w, "down", F.silu(gate).mul_(up))
        return _linear(w, "down", F.silu(_linear(w, "gate", x)).mul_(_linear(w, "up", x)))
    # in-place activation: one fresh multi-MB tensor fewer per call (page faults on the CPU)
    hid = _linear(w, "fc1", x)
    return _linear(w, "fc2", torch.relu_(hid) if spec.mlp == "relu" else F.gelu(hid))


def qkv(w: Weights, spec: ModelSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm (pre-norm models), q/k/v projections and q/k norms of x (..., h) -> (..., H*d), (..., G*d) x 2.
    Rows are independent here, so any number of micro-batches can go through at once."""
    H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    y = x if spec.post_norm else norm(w, "attn_norm", x, spec)
    if "qkv.weight" in w:  # one matmul instead of three (weights stored contiguously: see placement)
        q, k, v = _linear(w, "qkv", y).split((H * d, G * d, G * d), dim=-1)
    else:
        q, k, v = _linear(w, "q", y), _linear(w, "k", y), _linear(w, "v", y)
    if spec.qk_norm:
        q = norm(w, "q_norm", q.unflatten(-1, (H, d)), spec).flatten(-2)
        k = norm(w, "k_norm", k.unflatten(-1, (G, d)), spec).flatten(-2)
    return q, k, v


def attend_heads(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, t: int,
                 attend: Attend, rotary: CosSin | None = None) -> torch.Tensor:
    """One micro-batch's attention: q/k/v rows (b*t, width) -> output (b, t, H*d). RoPE is applied
    here, before K enters the cache, so cached keys are final."""
    H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q, k = q.reshape(b, t, H, d).transpose(1, 2), k.reshape(b, t, G, d).transpose(1, 2)
    v = v.reshape(b, t, G, d).transpose(1, 2)
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    return attend(q, k, v).transpose(1, 2).reshape(b, t, H * d)


def finish_layer(w: Weights, spec: ModelSpec, res: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Output projection, residual adds, norms and MLP: (..., H*d) attention output -> (..., h)."""
    # in-place residual adds: fewer fresh multi-MB tensors, and on the CPU each one costs page faults
    x = _linear(w, "o", o).add_(res)
    if spec.post_norm:
        x = norm(w, "attn_norm", x, spec)
    res = x
    if not spec.post_norm:
        x = norm(w, "mlp_norm", x, spec)
    x = _mlp(w, spec, x).add_(res)
    if spec.post_norm:
        x = norm(w, "mlp_norm", x, spec)
    return x


def decoder_layer(w: Weights, spec: ModelSpec, x: torch.Tensor, attend: Attend,
                  rotary: CosSin | None = None) -> torch.Tensor:
    """One decoder layer, pre-norm or post-norm (OPT-350m). x: (b, t, h); rotary: cos/sin of the
    new tokens' positions, (b, 1, t, d)."""
    b, t, _ = x.shape
    q, k, v = qkv(w, spec, x)
    return finish_layer(w, spec, x, attend_heads(spec, q, k, v, b, t, attend, rotary))


def lm_head(w: Weights, spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    """(b, t, h) -> fp32 logits (b, t, vocab)."""
    if spec.has_final_norm:
        x = norm(w, "final_norm", x, spec)
    if spec.has_projections:
        x = _linear(w, "project_out", x)
    return _linear(w, "lm_head", x).float()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    # enable_gqa: the kernels index a shared K/V head per group of query heads, with no copy
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                      window: int | None = None) -> torch.Tensor:
    """Causal self-attention over a left-padded prompt. key_mask: (b, s) bool, True = real token;
    window: a query sees only the last `window` positions (itself included).
    A pad query may see itself so no softmax row is empty (its output is never used)."""
    s = q.shape[2]
    idx = torch.arange(s, device=q.device)
    rel = idx[:, None] - idx[None, :]  # query index - key index
    causal = rel >= 0 if window is None else (rel >= 0) & (rel < window)
    allowed = (causal & key_mask[:, None, None, :]) | torch.eye(s, dtype=torch.bool, device=q.device)
    return _sdpa(q, k, v, allowed)


def window_mask(key_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """key_mask (b, n) bool with only the last `window` positions kept (sliding-window layers)."""
    if window is not None and key_mask.shape[1] > window:
        key_mask = key_mask.clone()
        key_mask[:, :key_mask.shape[1] - window] = False
    return key_mask


def decode_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                     key_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """q: (b, H, 1, d) against n cached keys (b, G, n, d); key_mask (b, n) bool."""
    allowed = window_mask(key_mask, window)
    if q.device.type == "cpu" and (q.dtype == torch.float32 or not cpu_amx()):
        # speed: the C loop reads each cached value once, pair by pair, where torch's SDPA makes
        # several passes. 2-core Zen 3 (AVX2, bf16 emulated): 1.2-1.7x SDPA in fp32, 5-12x in bf16.
        # 2-core Zen 4 (AVX512-BF16, no AMX), 32 rows x 32 heads x 48-512 cached positions:
        # 0.07-0.13 ns per cached value in bf16 against SDPA's 0.55-0.86 (5-9x), 1.3-2.4x in fp32.
        # With AMX, torch's bf16 SDPA measured 0.1-0.2 ns per cached value (an earlier session's
        # box, not compared with this loop since): it keeps SDPA there. None where the loop does
        # not apply (no compiler, head_dim not a multiple of 64, ...).
        out = kernels.attend_dense(q, k_all, v_all, allowed)
        if out is not None:
            return out
    return _sdpa(q, k_all, v_all, allowed[:, None, None, :])
