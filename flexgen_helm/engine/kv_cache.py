"""The attention (KV) cache of one block: one `CacheBlock` per (layer, micro-batch), each living
wholly on one tier.

Layouts, chosen for what each tier does most:
- compute and host tiers: head-major (2, b, H, capacity, d), so attention reads a prefix view with
  no copy (host blocks are attended in place when `cpu_cache_compute`);
- disk: position-major (capacity, 2, b, H, d), so a decode step reads one contiguous prefix and
  appends one contiguous row.
"""
from __future__ import annotations

from concurrent.futures import Future

import torch

from .tiers import ALIGN, DiskFile, Tiers, align_up


class CacheBlock:
    def __init__(self, tiers: Tiers, tier: str, rows: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, name: str):
        self.tiers, self.tier, self.dtype = tiers, tier, dtype
        self.shape = (2, rows, heads, capacity, head_dim)
        self.row_elems = 2 * rows * heads * head_dim  # one position of K and V (disk layout)
        self.es = torch.empty(0, dtype=dtype).element_size()
        self.nbytes = 2 * rows * heads * capacity * head_dim * self.es
        self.pending: Future | None = None
        self.file: DiskFile | None = None
        self.buf: torch.Tensor | None = None
        if tier == "disk":
            self.file = tiers.disk_file(name, self.nbytes, "KV cache")
        else:
            raw = tiers.alloc(tier, self.nbytes, "KV cache")
            self.buf = raw.view(dtype).view(self.shape)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    # ---- writes ----------------------------------------------------------------------------
    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values (b, H, t, d) at positions [start, start+t)."""
        t = k.shape[2]
        if self.buf is not None:
            self.buf[0, :, :, start:start + t].copy_(k, non_blocking=True)
            self.buf[1, :, :, start:start + t].copy_(v, non_blocking=True)
            if self.tier != "gpu":
                self.tiers.count("gpu->cpu", 2 * k.numel() * self.es)
            return
        # disk: (t, 2, b, H, d) rows, written by the I/O pool so compute does not wait on the disk
        rows = torch.stack((k, v)).permute(3, 0, 1, 2, 4).to("cpu", copy=True).contiguous()
        self.wait()
        nbytes = rows.numel() * self.es
        self.tiers.count("cpu->disk", nbytes)
        self.pending = self.tiers.pool.submit(
            self.file.write, start * self.row_elems * self.es, rows.view(-1).view(torch.uint8))

    # ---- reads -----------------------------------------------------------------------------
    def resident(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix views (b, H, n, d) of a block held in memory."""
        return self.buf[0, :, :, :n], self.buf[1, :, :, :n]

    def load(self, n: int, raw: torch.Tensor | None, dst: torch.Tensor) -> None:
        """Copy the first n positions into `dst` (head-major, (2, b, H, >=n, d) on the attention tier).
        raw: page-aligned uint8 scratch for disk reads."""
        dst = dst[:, :self.shape[1]]
        if self.buf is not None:
            dst[:, :, :, :n].copy_(self.buf[:, :, :, :n], non_blocking=True)
            self.tiers.count("cpu->gpu", 2 * self.buf[0, :, :, :n].numel() * self.es)
            return
        self.wait()
        nbytes = n * self.row_elems * self.es
        self.file.read_into(0, raw[:nbytes], parallel=False)
        rows = raw[:nbytes].view(self.dtype).view(n, *self.shape[:3], self.shape[4])
        dst[:, :, :, :n].copy_(rows.permute(1, 2, 3, 0, 4), non_blocking=True)

    def close(self) -> None:
        self.wait()
        if self.file is not None:
            self.file.remove()
        elif self.buf is not None:
            self.tiers.free(self.tier, self.nbytes)
            self.buf = None


def staging_nbytes(rows: int, heads: int, capacity: int, head_dim: int, es: int) -> tuple[int, int]:
    """(head-major attention buffer, raw disk read buffer incl. O_DIRECT slack) of one slot."""
    n = 2 * rows * heads * capacity * head_dim * es
    return n, align_up(n + ALIGN)
