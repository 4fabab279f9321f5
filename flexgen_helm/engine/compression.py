"""Group-wise min-max quantization of weights and the KV cache (FlexGen's scheme), in two flat tensors.

Scheme. A tensor is cut along `cfg.group_dim` into groups of `cfg.group_size` consecutive elements
(for an (out, in) Linear weight with group_dim=0, one group is 64 consecutive output rows of one input
column; for the KV cache with group_dim=-1, a group is (part of) one head's head_dim vector of one
token). Asymmetric (default): per group `lo = min`, `step = (max - min) / (2^b - 1)`,
`q = round((x - lo) / step)` in [0, 2^b - 1], and `x' = q * step + lo`. Symmetric: `step = absmax /
(2^(b-1) - 1)`, `q = round(x / step)` in [-(2^(b-1) - 1), 2^(b-1) - 1], stored with an offset.

Storage (what every tier holds and every link moves):
- `packed`: uint8, 1-D. The codes in (outer, group, in-group, inner) order, cut into blocks of
  64 bytes (4 bits: 128 codes, 2 bits: 256) or 96 bytes (3 bits: 256 codes, 8 per 24-bit word:
  truly 3 bits each). Inside a block, byte/word j holds codes j, j + W, j + 2W, ... (W = words per
  block) at increasing shifts, so unpacking is a few shifts with long contiguous runs (faster on
  the CPU than alternating nibbles). 8 bits: one code per byte, blocks of 8. The last block is
  zero-padded, so a tensor costs at most 95 bytes more than its bits; `packed_nbytes` counts them
  and is a multiple of 8.
- `meta`: float16, 1-D. Per group (lo, step) interleaved, or (step,) when symmetric, in
  (outer, group, inner) order. fp16 because fp32 meta would cost 8 B per 64-value group and take
  4-bit g64 from 0.28x to 0.31x of fp16. lo is rounded down and step up to fp16 *before* the codes
  are computed, so the stored grid still covers [min, max] and every element stays within half a
  step of its value (for values in fp16 range; beyond it the meta saturates, no inf/NaN).
For a single byte buffer use `to_buffer` / `from_buffer` ([packed | meta], both aligned).

Padding. An axis shorter than group_size forms one group of its own length (same result as padding
it, without storing the pad). Otherwise the last group is padded with copies of the axis' last
element, which never widens that group's range (FlexGen pads with zeros, which can).

Appending (KV cache): with group_dim the last axis, the leading rows of a tensor own a prefix of
`packed` and of `meta` whenever a row's code count is a multiple of the block (128 codes at 4 bits:
true for every OPT model's heads * head_dim), so tokens can be compressed one at a time and appended.

Speed. Arithmetic is fp32 in both directions whatever the dtypes, as separate mul and add kernels
(no fused multiply-add), so CPU and CUDA, engine and reference model give bit-equal values. On the
CPU, work is done in chunks of ~128K values with reused temporaries: full-size temporaries cost more
in allocation and page faults than the arithmetic itself (dequantization went from ~6 to ~1 ns per
value). On CUDA one chunk covers the tensor (the caching allocator makes temporaries cheap and
fewer, larger kernels are faster). Where a C compiler is available, CPU dequantization with groups
along the last axis (weights grouped along in_features, the KV cache) runs as one compiled loop
instead (engine/kernels: bit-equal, several times faster), and so does quantization with groups along
the last axis and no padding (a new token's KV row), else both run on the torch-op path.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import kernels
from .config import CompressionConfig, ConfigError

META_DTYPE = torch.float16
_META_BYTES = 2
_FP16_MAX = 65504.0
_CPU_CHUNK = 1 << 17  # values per CPU chunk: temporaries stay in cache and are reused
# bits -> (codes per block, bytes per block, codes per stored word, bytes per stored word)
# (64-byte rows of fields: torch's CPU kernels vectorize runs of 64 bytes ~4x better than 32)
_BLOCK = {8: (8, 8, 1, 1), 4: (128, 64, 2, 1), 2: (256, 64, 4, 1), 3: (256, 96, 8, 3)}


def _layout(shape, cfg: CompressionConfig) -> tuple[int, int, int, int, int]:
    """(outer, axis_len, num_groups, group_len, inner) of `shape` grouped along cfg.group_dim."""
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if nd == 0:
        raise ConfigError("cannot group-quantize a 0-d tensor")
    if not -nd <= cfg.group_dim < nd:
        raise ConfigError(f"group_dim={cfg.group_dim} is out of range for a {nd}-d tensor of shape {shape}")
    dim = cfg.group_dim % nd
    n = shape[dim]
    g = max(1, min(cfg.group_size, n))  # an axis shorter than a group is one group
    return math.prod(shape[:dim]), n, -(-n // g), g, math.prod(shape[dim + 1:])


def packed_nbytes(shape, cfg: CompressionConfig) -> int:
    """Bytes of the packed codes of a tensor of `shape` (group and block padding included)."""
    outer, _, ng, g, inner = _layout(shape, cfg)
    codes, nbytes = _BLOCK[cfg.num_bits][:2]
    return -(-(outer * ng * g * inner) // codes) * nbytes


def stacks_by_concatenation(shape, cfg: CompressionConfig) -> bool:
    """Is the packed form of n tensors of `shape` stacked on a new leading axis the concatenation of
    their packed forms, for every n? Yes when the group axis is counted from the end (stacking leaves
    it in place) and one tensor's codes fill whole blocks (no block padding between them)."""
    outer, _, ng, g, inner = _layout(shape, cfg)
    return cfg.group_dim < 0 and (outer * ng * g * inner) % _BLOCK[cfg.num_bits][0] == 0


def meta_numel(shape, cfg: CompressionConfig) -> int:
    """Number of fp16 meta values: 2 per group (lo, step), 1 when symmetric (step)."""
    outer, _, ng, _, inner = _layout(shape, cfg)
    return outer * ng * inner * (1 if cfg.symmetric else 2)


def compressed_nbytes(shape, cfg: CompressionConfig) -> int:
    """Stored bytes: packed codes plus fp16 meta. 4-bit g64: 36 B per 64 values = 0.28x fp16."""
    return packed_nbytes(shape, cfg) + _META_BYTES * meta_numel(shape, cfg)


def _fp16_toward(t: torch.Tensor, up: bool) -> torch.Tensor:
    """fp32 -> an fp16-representable value >= t (up) or <= t, returned as fp32.

    Steps one fp16 spacing (2^(e-11) for |x| in [2^(e-1), 2^e), at least the 2^-24 subnormal step)
    when the nearest fp16 lies on the wrong side. Below a power of two this skips a value: still a
    valid bound. frexp/ldexp instead of nextafter: fp16 nextafter is missing on CUDA in older torch.
    """
    h = t.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).float()  # saturate, never inf
    _, e = torch.frexp(h)
    ulp = torch.ldexp(torch.ones_like(h), e - 11).clamp_min_(2.0 ** -24).masked_fill_(h == 0, 2.0 ** -24)
    wrong = h < t if up else h > t
    return torch.where(wrong, h + ulp if up else h - ulp, h).clamp_(-_FP16_MAX, _FP16_MAX)


def _chunk_rows(rows: int, row_codes: int, bits: int, device: torch.device) -> int:
    """Rows per chunk: a whole number of blocks (so chunks pack independently), ~_CPU_CHUNK values."""
    if device.type != "cpu" or rows * row_codes <= _CPU_CHUNK:
        return max(rows, 1)
    block = _BLOCK[bits][0]
    unit = block // math.gcd(block, row_codes)  # fewest rows that fill whole blocks
    return max(unit, _CPU_CHUNK // row_codes // unit * unit)


def _pack(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """uint8 codes (a whole number of blocks, 1-D) -> `out` (uint8, bytes of those blocks)."""
    block, nbytes, per_word, word_bytes = _BLOCK[bits]
    if per_word == 1:
        out.copy_(codes)
        return
    c = codes.view(-1, per_word, nbytes // word_bytes)  # [block, field k, word j] = code k*W + j
    if word_bytes == 1:  # 2 and 4 bits: OR the shifted fields; fields stay inside their bytes
        o = out.view(c.shape[0], -1)
        o.copy_(c[:, 0])
        for k in range(1, per_word):
            o |= c[:, k] << (bits * k)
        return
    word = c[:, 0].to(torch.int32)  # 3 bits: 8 fields -> 24-bit word -> 3 little-endian bytes
    for k in range(1, per_word):
        word |= c[:, k].to(torch.int32) << (bits * k)
    o = out.view(c.shape[0], -1, word_bytes)
    for j in range(word_bytes):
        o[:, :, j] = (word >> (8 * j)) & 0xFF


def _unpack(packed: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Inverse of `_pack`: fill `out` (uint8, a whole number of blocks) from `packed`."""
    block, nbytes, per_word, word_bytes = _BLOCK[bits]
    if per_word == 1:
        out.copy_(packed)
        return
    nblocks = out.numel() // block
    dst = out.view(nblocks, per_word, -1)
    mask = (1 << bits) - 1
    if word_bytes == 1:  # 2 and 4 bits: scalar shift and mask per field, written in place
        word = packed.view(nblocks, nbytes)
        torch.bitwise_and(word, mask, out=dst[:, 0])
        for k in range(1, per_word - 1):
            torch.bitwise_and(word >> (bits * k), mask, out=dst[:, k])
        torch.bitwise_right_shift(word, bits * (per_word - 1), out=dst[:, -1])  # top field: no mask
        return
    b = packed.view(nblocks, 1, -1, word_bytes).to(torch.int32)  # 3 bits: 3 bytes -> 24-bit word
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    shifts = torch.arange(0, bits * per_word, bits, dtype=word.dtype, device=word.device).view(1, -1, 1)
    dst.copy_((word >> shifts) & mask)  # (blocks, 1, W) >> (1, k, 1) -> (blocks, k, W)


def quantize(x: torch.Tensor, cfg: CompressionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 1-D, meta float16 1-D) of x, both on x.device. Reads x in any float dtype."""
    outer, n, ng, g, inner = _layout(x.shape, cfg)
    bits, dev = cfg.num_bits, x.device
    packed = torch.empty(packed_nbytes(x.shape, cfg), dtype=torch.uint8, device=dev)
    meta = torch.empty(meta_numel(x.shape, cfg), dtype=META_DTYPE, device=dev)
    rows, row_codes = outer * ng, g * inner
    if rows * row_codes == 0:
        return packed, meta
    block, block_bytes = _BLOCK[bits][:2]
    # speed: one compiled pass where it applies (CPU, groups along the last axis, no padding): a new
    # token's K/V row is otherwise ~20 small torch kernels per (layer, micro-batch)
    if (dev.type == "cpu" and inner == 1 and ng * g == n and x.is_contiguous()
            and kernels.quantize_into(x.detach(), packed, meta, bits, block, block_bytes, g, cfg.symmetric)):
        return packed, meta
    src = x.detach().reshape(outer, n, inner)
    if ng * g != n:  # replicate the last element: the pad never changes a group's min/max
        src = torch.cat([src, src[:, -1:, :].expand(outer, ng * g - n, inner)], 1)
    src = src.reshape(rows, g, inner)
    meta2 = meta.view(rows, inner, -1)
    per = _chunk_rows(rows, row_codes, bits, dev)
    tmp = torch.empty(per, g, inner, device=dev)
    codes = torch.empty(-(-per * row_codes // block) * block, dtype=torch.uint8, device=dev)
    for r0 in range(0, rows, per):
        k = min(per, rows - r0)
        t = tmp[:k]
        t.copy_(src[r0:r0 + k])  # fp32 math whatever x's dtype: exact min/max and rounding
        if cfg.symmetric:
            top = 2 ** (bits - 1) - 1
            step = _fp16_toward(t.abs().amax(1, keepdim=True) / top, up=True)
            inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))  # all-zero group: 0s
            t.mul_(inv).round_().clamp_(-top, top).add_(top)
            meta2[r0:r0 + k, :, 0] = step[:, 0]
        else:
            top = 2 ** bits - 1
            lo = _fp16_toward(t.amin(1, keepdim=True), up=False)  # amin+amax beat aminmax on CPU
            step = _fp16_toward((t.amax(1, keepdim=True) - lo) / top, up=True)
            inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))  # constant group: 0s
            t.sub_(lo).mul_(inv).round_().clamp_(0, top)
            meta2[r0:r0 + k, :, 0] = lo[:, 0]
            meta2[r0:r0 + k, :, 1] = step[:, 0]
        nblocks = -(-k * row_codes // block)
        c = codes[:nblocks * block]
        c[:k * row_codes].copy_(t.view(-1).to(torch.int32))  # f32->i32->u8: 4x faster than f32->u8
        c[k * row_codes:].zero_()  # only the last chunk has a partial block
        b0 = r0 * row_codes // block * block_bytes
        _pack(c, bits, packed[b0:b0 + nblocks * block_bytes])
    return packed, meta


def dequantize(packed: torch.Tensor, meta: torch.Tensor, shape, cfg: CompressionConfig,
               dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor of `shape` and `dtype` on packed.device from `quantize`'s output.

    out: optional contiguous tensor of that shape and dtype to write into (saves an allocation;
    on the CPU a fresh multi-MB tensor costs page faults on first touch).
    """
    outer, n, ng, g, inner = _layout(shape, cfg)
    shape = tuple(int(s) for s in shape)
    if packed.numel() != packed_nbytes(shape, cfg) or meta.numel() != meta_numel(shape, cfg):
        raise ValueError(f"compressed data of {packed.numel()} B + {meta.numel()} meta values does not "
                         f"match shape {shape} under {cfg}")
    dev = packed.device
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=dev)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}")
    rows, row_codes = outer * ng, g * inner
    if rows * row_codes == 0:
        return out
    padded = ng * g != n
    dst = torch.empty(rows, g, inner, dtype=dtype, device=dev) if padded else out.view(rows, g, inner)
    bits = cfg.num_bits
    block, block_bytes = _BLOCK[bits][:2]
    # speed: one compiled pass over memory where it applies (CPU, groups along the last axis)
    if (dev.type == "cpu" and inner == 1 and kernels.dequantize_into(
            packed, meta, dst.view(-1), rows * row_codes, bits, block, block_bytes, g, cfg.symmetric)):
        if padded:
            out.view(outer, n, inner).copy_(dst.view(outer, ng * g, inner)[:, :n])
        return out
    m = meta.to(device=dev).view(rows, inner, -1)
    per = _chunk_rows(rows, row_codes, bits, dev)
    tmp = None if dtype == torch.float32 else torch.empty(per, g, inner, device=dev)
    codes = torch.empty(-(-per * row_codes // block) * block, dtype=torch.uint8, device=dev)
    for r0 in range(0, rows, per):
        k = min(per, rows - r0)
        nblocks = -(-k * row_codes // block)
        b0 = r0 * row_codes // block * block_bytes
        c = codes[:nblocks * block]
        _unpack(packed[b0:b0 + nblocks * block_bytes], bits, c)
        t = dst[r0:r0 + k] if tmp is None else tmp[:k]  # fp32 output: compute in place
        t.view(-1).copy_(c[:k * row_codes])
        # (lo, step) planes made contiguous: broadcasting a stride-2 operand is ~3x slower
        mk = m[r0:r0 + k].permute(2, 0, 1).float().contiguous().unsqueeze(2)  # (1|2, k, 1, inner)
        if cfg.symmetric:
            t.sub_(2 ** (bits - 1) - 1).mul_(mk[0])
        else:
            t.mul_(mk[1]).add_(mk[0])
        if tmp is not None:
            dst[r0:r0 + k].copy_(t)
    if padded:
        out.view(outer, n, inner).copy_(dst.view(outer, ng * g, inner)[:, :n])
    return out


def dequantize_transposed(packed: torch.Tensor, meta: torch.Tensor, out: torch.Tensor, rows_of: tuple[int, ...],
                          cfg: CompressionConfig) -> bool:
    """Dequantize a tensor grouped along its last axis straight into `out`, a strided view whose axes
    are the tensor's in another order (rows_of[a] = out's axis for the tensor's axis a; the last
    axis stays last and contiguous): one pass instead of dequantize + a transposing copy. Same
    values as `dequantize`. False (nothing written) where the compiled loop cannot do it."""
    d = out.shape[-1]
    g = max(1, min(cfg.group_size, d))
    if cfg.group_dim not in (-1, out.dim() - 1) or d % g or out.device.type != "cpu":
        return False
    block, block_bytes = _BLOCK[cfg.num_bits][:2]
    return kernels.dequantize_into(packed, meta, out, out.numel(), cfg.num_bits, block, block_bytes, g,
                                   cfg.symmetric, rows_of=rows_of)


def fake_quantize(x: torch.Tensor, cfg: CompressionConfig) -> torch.Tensor:
    """dequantize(quantize(x)): what the compute device sees, same shape and dtype as x."""
    packed, meta = quantize(x, cfg)
    return dequantize(packed, meta, x.shape, cfg, x.dtype)


def to_buffer(x: torch.Tensor, cfg: CompressionConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """Compress x into one flat uint8 buffer of compressed_nbytes: [packed | meta fp16 bytes].

    packed_nbytes is a multiple of 8, so the meta starts aligned wherever the buffer does."""
    packed, meta = quantize(x, cfg)
    if out is None:
        return torch.cat([packed, meta.view(torch.uint8)])
    out[:packed.numel()].copy_(packed)
    out[packed.numel():packed.numel() + 2 * meta.numel()].copy_(meta.view(torch.uint8))
    return out


def from_buffer(buf: torch.Tensor, shape, cfg: CompressionConfig, dtype: torch.dtype,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `to_buffer` (buf: uint8, at least compressed_nbytes long)."""
    pb = packed_nbytes(shape, cfg)
    meta = buf[pb:pb + _META_BYTES * meta_numel(shape, cfg)].view(META_DTYPE)
    return dequantize(buf[:pb], meta, shape, cfg, dtype, out)


# ---- reference ("quantize, dequantize, run uncompressed") models ------------------------------------

def fake_quantize_model(model: torch.nn.Module, cfg: CompressionConfig, min_ndim: int = 2) -> list[str]:
    """Replace every parameter with >= min_ndim dims by its fake-quantized value, in place.

    With min_ndim=2 that is every matrix (Linear weights, token and position embeddings; OPT's tied
    lm_head is the token embedding and is quantized once) and no bias or LayerNorm vector, as FlexGen
    does. Returns the names changed.
    """
    done = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= min_ndim:
                p.copy_(fake_quantize(p, cfg))
                done.append(name)
    return done


def kivi_fake_quantize_keys(k: torch.Tensor, cfg: CompressionConfig, token_dim: int) -> torch.Tensor:
    """KIVI-style keys: group along the token axis (one group = group_size tokens of one channel).

    Only whole groups are quantized; the trailing len % group_size tokens stay full precision, as in
    KIVI's residual window. Limits (simulation only, the engine does not store this layout): the
    quantization of a key depends on the later tokens of its group, which a streaming cache would
    not know yet; and tokens that arrive one per decode step are never quantized.
    """
    t = k.shape[token_dim]
    whole = t // cfg.group_size * cfg.group_size
    if whole == 0:
        return k
    head = fake_quantize(k.narrow(token_dim, 0, whole), replace(cfg, group_dim=token_dim))
    return torch.cat([head, k.narrow(token_dim, whole, t - whole)], token_dim)


def fake_quantize_kv_cache(model: torch.nn.Module, cfg: CompressionConfig,
                           kivi_keys: bool = False) -> list:
    """Make a transformers model attend to fake-quantized keys and values, of any family.

    A registered attention function quantizes the K/V it is handed (after RoPE and q/k norms, as
    they enter the engine's cache) with `cfg` (group_dim=-1: along head_dim, FlexGen's choice), or,
    for keys with kivi_keys, per channel along the tokens (`kivi_fake_quantize_keys`), then runs
    SDPA. It sees the whole cache every step; values already on the grid quantize to themselves, so
    every token's K/V is quantized exactly once in effect. Remove with `[h.remove() for h in handles]`.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not hasattr(model, "set_attn_implementation"):
        raise ConfigError("fake_quantize_kv_cache needs a transformers model (set_attn_implementation)")
    previous = model.config._attn_implementation

    def attention(module, query, key, value, *args, **kwargs):
        key = kivi_fake_quantize_keys(key, cfg, token_dim=-2) if kivi_keys else fake_quantize(key, cfg)
        return sdpa_attention_forward(module, query, key, fake_quantize(value, cfg), *args, **kwargs)

    name = f"flexgen_fake_quantized_kv_{id(model)}"
    AttentionInterface.register(name, attention)
    # the mask too: an attention name without one gets no sliding window (Mistral, Qwen2 windows)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)

    class _Restore:
        def remove(self) -> None:
            model.set_attn_implementation(previous)
    return [_Restore()]


# ---- 4-bit weights in torch's fused CPU matmul layout ----------------------------------------------
# `_weight_int4pack_mm_for_cpu` multiplies by 4-bit weights without materialising them: w = (q - 8) * s + z
# with groups along in_features (K). With step s and z = lo + 8 * s this is our asymmetric q * s + lo,
# so the same codes serve both. The packed layout depends on the CPU's instruction set
# (torch.backends.cpu.get_cpu_capability()): weights are packed in the process that uses them, when
# they are written to their tiers, and offload files never outlive that process.
INT4PACK_GROUPS = (32, 64, 128, 256)


def int4pack_ok(shape, cfg: CompressionConfig) -> bool:
    """Can an (out, in) weight with this config use the fused CPU kernel?"""
    if len(shape) != 2:
        return False
    n, k = shape
    return (cfg.num_bits == 4 and not cfg.symmetric and cfg.group_dim in (1, -1) and cfg.group_size in INT4PACK_GROUPS
            and k % cfg.group_size == 0 and n % 16 == 0)


def int4pack_nbytes(shape, cfg: CompressionConfig, dtype_bytes: int) -> int:
    """Packed codes (n * k / 2 bytes) + scales and zeros ((k / G) x n x 2 in the compute dtype)."""
    n, k = shape
    return n * k // 2 + (k // cfg.group_size) * n * 2 * dtype_bytes


def to_int4pack(x: torch.Tensor, cfg: CompressionConfig, dtype: torch.dtype, out: torch.Tensor) -> None:
    """Quantize an (out, in) weight like `quantize` (groups along in) and write it into `out` (uint8,
    int4pack_nbytes long) in the fused kernel's layout."""
    n, k = x.shape
    packed, meta = quantize(x, cfg)
    codes = torch.empty(-(-n * k // 128) * 128, dtype=torch.uint8)
    _unpack(packed, 4, codes)
    q = codes[:n * k].view(n, k).to(torch.int32)
    m = meta.view(n, k // cfg.group_size, 2).float()
    step, lo = m[..., 1], m[..., 0]
    sz = torch.stack((step, lo + 8 * step), dim=-1).transpose(0, 1).contiguous().to(dtype)  # (k/G, n, 2)
    pk = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    out[:pk.numel()].copy_(pk.view(-1).view(torch.uint8))
    out[n * k // 2:n * k // 2 + sz.numel() * sz.element_size()].copy_(sz.view(-1).view(torch.uint8))


class Int4Weight:
    """A 4-bit (out, in) weight in the fused kernel's layout, viewed over a staging buffer."""
    kind = "int4pack"  # placement slot kind
    ok = staticmethod(int4pack_ok)
    nbytes = staticmethod(int4pack_nbytes)
    write = staticmethod(to_int4pack)  # (x, cfg, dtype, out): quantize into a slot

    def __init__(self, buf: torch.Tensor, shape, cfg: CompressionConfig, dtype: torch.dtype):
        self.out_features, self.in_features = shape
        self.group_size = cfg.group_size
        n, k = shape
        self.packed = buf[:n * k // 2].view(n, k // 2)
        sz_bytes = (k // self.group_size) * n * 2 * dtype.itemsize
        self.sz = buf[n * k // 2:n * k // 2 + sz_bytes].view(dtype).view(k // self.group_size, n, 2)

    @classmethod
    def from_dense(cls, w: torch.Tensor, cfg: CompressionConfig, dtype: torch.dtype) -> "Int4Weight":
        """Quantize and pack an (out, in) weight into a buffer of its own (probes and benchmarks; the
        engine packs into its tier buffers with `to_int4pack`)."""
        buf = torch.empty(int4pack_nbytes(tuple(w.shape), cfg, dtype.itemsize), dtype=torch.uint8)
        to_int4pack(w, cfg, dtype, buf)
        return cls(buf, tuple(w.shape), cfg, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> x @ w.T (..., out), in x's dtype (the scales' dtype)."""
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size, self.sz)
        return y.view(*x.shape[:-1], self.out_features)


# Bumped whenever a stored byte layout changes: shared host-weight files are keyed by it, so a file
# written by an older version is never read as the new layout.
LAYOUT_VERSION = 2  # 2: GroupInt4Weight's K slices

# Values per K slice of a GroupInt4Weight (int4_k_slice). Speed: the compiled loop keeps a tile's
# 16-bit activations (2 bytes per value and row) in L1 while a block of weight rows streams past;
# rows of K 8192 and more spilled them to L2. 2 Zen 4 cores, slices of 4096 vs whole rows, GFLOP/s
# at one row: 2048 x 8192 104 vs 85, 1024 x 16384 93 vs 54, 1792 x 28672 97 vs 55 (0.98-1.10x from
# 4 rows); in a simulation slices of 2048 lost (0.76-0.87x: more per-slice work, shorter streams).
INT4_K_SLICE = 4096


def int4_k_slice(k: int, group: int) -> int:
    """Slice length along K for a GroupInt4Weight with `k` in-features and groups of `group`: k
    itself below 2 INT4_K_SLICE, else the longest slice of at most INT4_K_SLICE values (and at least
    half that) that cuts k into whole 128-value blocks and groups, else the shortest longer one
    (e.g. 8192 -> 4096, 14336 -> 3584, 28672 -> 4096, 11008 -> 5504)."""
    unit = math.lcm(128, group)
    if k < 2 * INT4_K_SLICE or k % unit:
        return k
    fits = [k // s for s in range(1, k // unit + 1) if k % s == 0 and (k // s) % unit == 0]
    near = [ks for ks in fits if INT4_K_SLICE // 2 <= ks <= INT4_K_SLICE]
    return max(near) if near else min(ks for ks in fits if ks > INT4_K_SLICE)


class GroupInt4Weight:
    """A 4-bit (out, in) weight in this module's own [packed | meta] format (groups along in),
    multiplied where it lies by the compiled loop (kernels.int4_matmul): the fused path for fp32
    activations, where torch's fused kernel takes a scalar path. The format is the same on every
    CPU, so nothing is repacked. Without the compiled loop it dequantizes per call (slow, correct).

    Layout: the in-features are cut into slices of `ks` values (int4_k_slice; one slice, i.e. plain
    rows, below 8192) and stored slice-major: the [packed | meta] quantization of the (S out, ks)
    matrix whose rows are slice 0 of every output row, then slice 1, ... (same groups, same codes)."""
    kind = "int4"  # placement slot kind

    def __init__(self, buf: torch.Tensor, shape, cfg: CompressionConfig, dtype: torch.dtype):
        self.shape, self.cfg, self.dtype = tuple(shape), cfg, dtype
        self.ks = int4_k_slice(self.shape[1], cfg.group_size)
        pb = packed_nbytes(self.shape, cfg)
        self.packed = buf[:pb]
        self.meta = buf[pb:pb + _META_BYTES * meta_numel(self.shape, cfg)].view(META_DTYPE)
        self.parts = kernels.Int4Parts([(self.packed, self.meta, self.shape[0])])  # (codes, meta, rows) along out

    @classmethod
    def stacked(cls, weights: list["GroupInt4Weight"]) -> "GroupInt4Weight | None":
        """One weight over several with the same in-features and format (e.g. q, k and v), stacked
        along out, each read where it lies: one kernel call instead of several. None if they differ."""
        first = weights[0]
        if not all(isinstance(w, GroupInt4Weight) and w.shape[1] == first.shape[1] and w.cfg == first.cfg
                   and w.dtype == first.dtype for w in weights):
            return None
        out = cls.__new__(cls)
        out.shape = (sum(w.shape[0] for w in weights), first.shape[1])
        out.cfg, out.dtype, out.ks = first.cfg, first.dtype, first.ks
        out.packed = out.meta = None  # see parts
        out.parts = kernels.Int4Parts(p for w in weights for p in w.parts)
        return out

    @staticmethod
    def ok(shape, cfg: CompressionConfig) -> bool:
        return (len(shape) == 2 and cfg.num_bits == 4 and not cfg.symmetric and cfg.group_dim in (1, -1)
                and kernels.int4_matmul_ok(shape, cfg.group_size))

    @staticmethod
    def nbytes(shape, cfg: CompressionConfig, dtype_bytes: int) -> int:
        return compressed_nbytes(shape, cfg)

    @staticmethod
    def write(x: torch.Tensor, cfg: CompressionConfig, dtype: torch.dtype, out: torch.Tensor) -> None:
        """Quantize the (out, in) weight x into `out` (compressed_nbytes) in this class's layout, one K
        slice at a time: no slice-major copy of the whole weight (OPT-30B's fc2 would take 822 MB more
        host memory in fp32)."""
        n, k = x.shape
        ks = int4_k_slice(k, cfg.group_size)
        if ks == k:
            to_buffer(x, cfg, out=out)
            return
        pb, mb = packed_nbytes((n, ks), cfg), meta_numel((n, ks), cfg)  # per slice: whole blocks
        metas = out[packed_nbytes((n, k), cfg):compressed_nbytes((n, k), cfg)].view(META_DTYPE)
        for s in range(k // ks):
            packed, meta = quantize(x[:, s * ks:(s + 1) * ks].contiguous(), cfg)
            out[s * pb:(s + 1) * pb].copy_(packed)
            metas[s * mb:(s + 1) * mb].copy_(meta)

    @classmethod
    def from_dense(cls, w: torch.Tensor, cfg: CompressionConfig, dtype: torch.dtype) -> "GroupInt4Weight":
        buf = torch.empty(compressed_nbytes(tuple(w.shape), cfg), dtype=torch.uint8)
        cls.write(w, cfg, dtype, buf)
        return cls(buf, tuple(w.shape), cfg, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> x @ w.T (..., out) in x's dtype."""
        n, k = self.shape
        y = kernels.int4_matmul(self.parts, x, k, self.cfg.group_size, self.ks)
        if y is None:
            w = torch.empty(n, k, dtype=x.dtype)
            y = x @ self.dequantize_rows_into(0, n, w).T
        return y

    def dequantize_rows_into(self, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
        """Output rows [a, b) of the weight dequantized into `out` ((b - a, in), fp32 or bf16): each
        row owns its own span of codes and scales in every slice (groups along in), so rows slice
        cleanly; a slice of rows lands in its columns of `out` in one pass."""
        k, ks, start = self.shape[1], self.ks, 0
        for packed, meta, rows in self.parts:
            lo, hi = max(a, start), min(b, start + rows)
            if lo < hi:
                per_row = meta.numel() // (rows * (k // ks))  # meta values per row of one slice
                for s in range(k // ks):
                    i, j = s * rows + lo - start, s * rows + hi - start
                    p, m = packed[i * ks // 2:j * ks // 2], meta[i * per_row:j * per_row]
                    dst = out[lo - a:hi - a, s * ks:(s + 1) * ks]
                    if dst.is_contiguous():
                        dequantize(p, m, (j - i, ks), self.cfg, out.dtype, out=dst)
                    elif not dequantize_transposed(p, m, dst, (0,), self.cfg):
                        dst.copy_(dequantize(p, m, (j - i, ks), self.cfg, out.dtype))
            start += rows
        return out


FUSED_INT4_KINDS = {cls.kind: cls for cls in (Int4Weight, GroupInt4Weight)}
FUSED_INT4_TYPES = tuple(FUSED_INT4_KINDS.values())


def fused_int4(dtype_bytes: int) -> type[Int4Weight] | type[GroupInt4Weight]:
    """The class of 4-bit weights multiplied without a dequantized copy for this compute dtype: the
    one place that pairs a dtype with its fused kernel. fp32: the compiled loop (torch's kernel takes
    a scalar path there). bf16: the compiled loop (on bf16 activations in 16-bit fixed point) unless
    the CPU has AMX, where torch's kernel stays. GFLOP/s loop vs torch's kernel, 8192 x 2048 read
    from memory: 2 Zen 3 cores (bf16 emulated) 33 vs 20 at one row, on par at 256; 2 Zen 4 cores
    (AVX512-BF16, no AMX) 106 vs 75 at one row, 158 vs 120 at 2, 153 vs 169 at 4, 159-189 vs
    165-171 at 8-128, and in a slower hour 66-79 vs 63-64 at one row but 110-137 vs 134-146 at 4-32
    (the loop leads at one row in every hour measured). From kernels.int4_dq_min_rows rows, AVX512-BF16
    builds multiply bf16 blocks of the weight instead (255-269 GFLOP/s at 16 rows, 406-411 at 256);
    beyond layers.int4_loop_max_rows the weights are dequantized per call."""
    from .config import cpu_has_amx
    if kernels.available() and (dtype_bytes == 4 or (dtype_bytes == 2 and not cpu_has_amx())):
        return GroupInt4Weight
    return Int4Weight


class RowQuantizedTable:
    """A compressed embedding table grouped along its rows (group_dim 1): a lookup dequantizes only
    the rows asked for, instead of the whole table at every load (the 50K-256K-row token tables
    are the biggest tensors of a model, and a decode step reads one row per sequence)."""

    def __init__(self, buf: torch.Tensor, shape, cfg: CompressionConfig, dtype: torch.dtype):
        self.shape, self.cfg, self.dtype = tuple(shape), cfg, dtype
        rows, width = self.shape
        pb = packed_nbytes(self.shape, cfg)
        self.packed = buf[:pb].view(rows, -1)  # whole 64-byte blocks per row: see row_lookup_ok
        self.meta = buf[pb:pb + _META_BYTES * meta_numel(self.shape, cfg)].view(META_DTYPE).view(rows, -1)

    @staticmethod
    def ok(shape, cfg: CompressionConfig) -> bool:
        """Each row owns whole packing blocks and whole groups, so rows can be cut out alone."""
        if len(shape) != 2 or cfg.group_dim not in (1, -1):
            return False
        block = _BLOCK[cfg.num_bits][0]
        return shape[1] % block == 0 and shape[1] % cfg.group_size == 0

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> rows (..., width) in the compute dtype, like F.embedding on the dense table."""
        flat = ids.reshape(-1)
        width = self.shape[1]
        rows = dequantize(self.packed[flat].reshape(-1), self.meta[flat].reshape(-1), (flat.numel(), width),
                          self.cfg, self.dtype)
        return rows.view(*ids.shape, width)
