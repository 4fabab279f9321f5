"""The attention (KV) cache of one block: one `CacheBlock` per (layer, micro-batch), each living
wholly on one tier.

Layouts, chosen for what each tier does most:
- dense, in memory (compute or host tier): head-major (2, b, H, capacity, d), so attention reads a
  prefix view with no copy (host blocks are attended in place when `cpu_cache_compute`);
- on disk, or compressed anywhere: position-major rows, so a decode step reads one contiguous
  prefix and appends one contiguous row. Compressed rows keep packed codes and fp16 scales in two
  regions, so a prefix of n positions is exactly the compressed form of an (n, 2, b, H, d) tensor
  and dequantizes in one call.
"""
from __future__ import annotations

import math
from concurrent.futures import Future

import torch

from . import compression, kernels
from .config import CompressionConfig
from .tiers import ALIGN, DiskFile, Tiers, align_up


def row_nbytes(rows: int, heads: int, head_dim: int, es: int, cfg: CompressionConfig | None) -> tuple[int, int]:
    """(packed or dense bytes, meta bytes) of one position of K and V."""
    shape = (2, rows, heads, head_dim)
    if cfg is None:
        return 2 * rows * heads * head_dim * es, 0
    return compression.packed_nbytes(shape, cfg), 2 * compression.meta_numel(shape, cfg)


def block_nbytes(rows: int, heads: int, capacity: int, head_dim: int, es: int, cfg: CompressionConfig | None) -> int:
    pk, mt = row_nbytes(rows, heads, head_dim, es, cfg)
    return align_up(capacity * pk, 64) + capacity * mt


class CacheBlock:
    def __init__(self, tiers: Tiers, tier: str, rows: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, name: str, cfg: CompressionConfig | None = None):
        self.tiers, self.tier, self.dtype, self.cfg = tiers, tier, dtype, cfg
        self.shape = (2, rows, heads, capacity, head_dim)
        self.es = torch.empty(0, dtype=dtype).element_size()
        self.pk, self.mt = row_nbytes(rows, heads, head_dim, self.es, cfg)
        self.meta_off = align_up(capacity * self.pk, 64)
        self.nbytes = block_nbytes(rows, heads, capacity, head_dim, self.es, cfg)
        self.head_major = cfg is None and tier != "disk"
        self.pending: Future | None = None
        self.file: DiskFile | None = None
        self.buf: torch.Tensor | None = None  # head-major view (dense in memory)
        self.raw: torch.Tensor | None = None  # uint8 rows (compressed in memory)
        self._in_place_ok: dict[int, bool] = {}  # attends_in_place, by number of query heads
        if tier == "disk":
            self.file = tiers.disk_file(name, self.nbytes, "KV cache")
        else:
            mem = self._mem = tiers.alloc(tier, self.nbytes, "KV cache")
            if self.head_major:  # (the allocation is rounded up to 64 bytes: view just the shape's bytes)
                self.buf = mem[:self.es * math.prod(self.shape)].view(dtype).view(self.shape)
            else:
                self.raw = mem

    @property
    def staged(self) -> bool:
        """Does attention need this block's prefix copied (and maybe dequantized) first?"""
        return not self.head_major

    def wait(self) -> None:
        if self.pending is not None:
            fut, self.pending = self.pending, None  # a failed write is reported once
            fut.result()

    # ---- writes ----------------------------------------------------------------------------
    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (b, H, t, d) at positions [start, start+t). Returns the (k, v) that
        attention must use: the inputs, or for a compressed cache their dequantized values, so the
        current token sees exactly what later tokens will read back."""
        t = k.shape[2]
        if self.buf is not None:
            self.buf[0, :, :, start:start + t].copy_(k, non_blocking=True)
            self.buf[1, :, :, start:start + t].copy_(v, non_blocking=True)
            if self.tier != "gpu":
                self.tiers.count("gpu->cpu", 2 * k.numel() * self.es)
            return k, v
        rows = torch.stack((k, v)).permute(3, 0, 1, 2, 4).contiguous()  # (t, 2, b, H, d)
        if self.cfg is None:
            data, meta = rows.view(-1).view(torch.uint8), None
        else:
            data, meta = self._quantize_rows(rows)
            rows = self._dequantize_rows(data, meta, t, rows.device)
            k, v = rows[:, 0].permute(1, 2, 0, 3), rows[:, 1].permute(1, 2, 0, 3)
        if self.raw is not None:  # compressed, in memory
            self.raw[start * self.pk:(start + t) * self.pk].copy_(data, non_blocking=True)
            self.raw[self.meta_off + start * self.mt:self.meta_off + (start + t) * self.mt].copy_(meta)
            if self.tier != "gpu":
                self.tiers.count("gpu->cpu", data.numel() + meta.numel())
            return k, v
        data = data.to("cpu", copy=True)
        meta = meta.to("cpu", copy=True) if meta is not None else None
        self.wait()
        self.tiers.count("cpu->disk", data.numel() + (meta.numel() if meta is not None else 0))

        def store():  # by the I/O pool, so compute does not wait on the disk
            self.file.write(start * self.pk, data)
            if meta is not None:
                self.file.write(self.meta_off + start * self.mt, meta)
        self.pending = self.tiers.pool.submit(store)
        return k, v

    def _quantize_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed bytes of t positions, laid out as t consecutive per-position rows."""
        if rows.shape[0] == 1 or self._prefix_aligned():
            packed, meta = compression.quantize(rows, self.cfg)
            return packed, meta.view(torch.uint8)
        parts = [compression.quantize(r, self.cfg) for r in rows]
        return torch.cat([p for p, _ in parts]), torch.cat([m.view(torch.uint8) for _, m in parts])

    def _dequantize_rows(self, data: torch.Tensor, meta: torch.Tensor, n: int, device) -> torch.Tensor:
        """(n, 2, b, H, d) from n consecutive compressed rows."""
        data, m = data.to(device), meta.to(device).view(compression.META_DTYPE)
        shape = (n,) + self.shape[:3] + self.shape[4:]
        if n == 1 or self._prefix_aligned():
            return compression.dequantize(data, m, shape, self.cfg, self.dtype)
        per = self.mt // 2
        return torch.stack([compression.dequantize(data[i * self.pk:(i + 1) * self.pk], m[i * per:(i + 1) * per],
                                                   shape[1:], self.cfg, self.dtype) for i in range(n)])

    def _prefix_aligned(self) -> bool:
        """Is the packed form of n positions the concatenation of n per-position rows?"""
        return compression.stacks_by_concatenation((2,) + self.shape[1:3] + self.shape[4:], self.cfg)

    # ---- reads -----------------------------------------------------------------------------
    def attends_in_place(self, num_q_heads: int) -> bool:
        """Can decode attention read this block's compressed prefix where it lies (CPU, in memory),
        with no dequantized copy? (kernels.attend_compressed, when the C loop is built.) Fixed for
        the block's life, and asked per (layer, micro-batch) every step: worked out once."""
        if num_q_heads not in self._in_place_ok:
            self._in_place_ok[num_q_heads] = self._can_attend_in_place(num_q_heads)
        return self._in_place_ok[num_q_heads]

    def _can_attend_in_place(self, num_q_heads: int) -> bool:
        if self.cfg is None or self.raw is None or self.raw.device.type != "cpu" or not self._prefix_aligned():
            return False
        rows, heads, d = self.shape[1], self.shape[2], self.shape[4]
        g = max(1, min(self.cfg.group_size, d))
        block = compression._BLOCK[self.cfg.num_bits][0]
        return (self.dtype in (torch.float32, torch.bfloat16) and self.cfg.num_bits in (2, 4, 8)
                and self.cfg.group_dim in (-1, 4) and kernels.attend_compressed_ok(rows, heads, num_q_heads, d, block, g)
                and kernels.available())

    def attend_in_place(self, n: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        allowed: torch.Tensor) -> torch.Tensor:
        """Attention of q (b, Hq, 1, d) over the n cached positions plus the new k, v (b, H, 1, d);
        allowed (b, n + 1) bool. Speed: reads the 4-bit codes once, instead of dequantizing the prefix
        into a staging buffer and running SDPA over it (2x the memory traffic of a dense cache)."""
        d = self.shape[4]
        block, block_bytes = compression._BLOCK[self.cfg.num_bits][:2]
        out = kernels.attend_compressed(self.raw[:n * self.pk], self.raw[self.meta_off:self.meta_off + n * self.mt]
                                        .view(compression.META_DTYPE), n, q, k, v, allowed, self.cfg.num_bits,
                                        block, block_bytes, max(1, min(self.cfg.group_size, d)), self.cfg.symmetric)
        if out is None:
            raise RuntimeError("compressed-cache attention refused arguments attends_in_place accepted")
        return out

    def resident(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix views (b, H, n, d) of a dense block held in memory."""
        return self.buf[0, :, :, :n], self.buf[1, :, :, :n]

    def load(self, n: int, scratch: torch.Tensor, dst: torch.Tensor, where: str) -> None:
        """Copy the first n positions into `dst` (head-major (2, b, H, >=n, d) on tier `where`,
        where attention runs). scratch: page-aligned uint8 host buffer for disk reads."""
        dst = dst[:, :self.shape[1]]
        moved = self.tier != where
        if self.buf is not None:
            dst[:, :, :, :n].copy_(self.buf[:, :, :, :n], non_blocking=True)
            if moved:
                self.tiers.count("cpu->gpu", 2 * self.buf[0, :, :, :n].numel() * self.es)
            return
        meta = None
        if self.file is not None:
            self.wait()
            data = scratch[:n * self.pk]
            self.file.read_into(0, data, parallel=False)
            if self.cfg is not None:
                meta = scratch[self.meta_off:self.meta_off + n * self.mt]
                self.file.read_into(self.meta_off, meta, parallel=False)
            moved = where == "gpu" and self.tiers.on_cuda
        else:
            data = self.raw[:n * self.pk]
            meta = self.raw[self.meta_off:self.meta_off + n * self.mt]
        if moved:
            self.tiers.count("cpu->gpu", data.numel() + (meta.numel() if meta is not None else 0))
        if self.cfg is None:
            rows = data.to(dst.device, non_blocking=True).view(self.dtype).view((n,) + self.shape[:3] + self.shape[4:])
        else:  # dequantized where attention runs: only compressed bytes cross the link
            # speed: on the CPU, dequantize the position-major rows straight into the head-major
            # buffer (one pass; no temporary, no transposing copy)
            if (self._prefix_aligned() and dst.device.type == "cpu" and compression.dequantize_transposed(
                    data, meta.view(compression.META_DTYPE), dst[:, :, :, :n], (3, 0, 1, 2), self.cfg)):
                return
            rows = self._dequantize_rows(data, meta, n, dst.device)
        dst[:, :, :, :n].copy_(rows.permute(1, 2, 3, 0, 4), non_blocking=True)

    def close(self) -> None:
        try:
            self.wait()
        finally:  # release even when the last write failed (a full disk)
            if self.file is not None:
                self.file.remove()
                self.file = None
            elif self.buf is not None or self.raw is not None:
                self.tiers.free_buffer(self.tier, self._mem, self.nbytes)
                self.buf = self.raw = self._mem = None


def staging_nbytes(rows: int, heads: int, capacity: int, head_dim: int, es: int,
                   cfg: CompressionConfig | None) -> tuple[int, int]:
    """(head-major attention buffer, raw disk read buffer incl. O_DIRECT slack) of one slot."""
    dense = 2 * rows * heads * capacity * head_dim * es
    return dense, align_up(block_nbytes(rows, heads, capacity, head_dim, es, cfg) + ALIGN)
