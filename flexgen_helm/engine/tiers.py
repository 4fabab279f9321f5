"""The three memory tiers behind one small interface, with byte accounting against budgets.

- "gpu": the compute device. On a CPU-only machine it is a budgeted region of host memory, so every
  placement and schedule runs (and is tested) without a GPU.
- "cpu": host memory (pinned when the compute device is CUDA and pinning is asked for).
- "disk": files inside the user's offload directory. Reads use O_DIRECT so measured bandwidth is the
  disk's, not the page cache's; where the filesystem refuses O_DIRECT (tmpfs) reads fall back to
  buffered I/O plus POSIX_FADV_DONTNEED and the fallback is counted in `page_cache_fallback`.
"""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .config import ConfigError

ALIGN = 4096  # O_DIRECT needs offset, length and buffer address aligned to the logical block size
CHUNK = 8 << 20  # 8 MB per read request: ~2.6 GB/s here vs ~1.5 GB/s at 1 MB


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _spare_cores() -> int:
    """Cores the calling thread's torch threads leave free (0 or less: none)."""
    return (os.cpu_count() or 1) - torch.get_num_threads()


def copies_share_compute_cores(device: torch.device) -> bool:
    """True when a copy made beside the compute would run on the compute's own cores: a CPU
    compute device whose torch threads take every core (CUDA copies run on DMA engines)."""
    return device.type == "cpu" and _spare_cores() <= 0


def io_thread_torch_threads(device: torch.device) -> int | None:
    """Torch threads for each I/O worker: on a CPU compute device, the cores the compute's own torch
    threads leave free (at least 1); on CUDA, torch's default (None). Torch's thread count is
    per thread (OpenMP), so a worker that never sets it runs its copies and kernels on every core:
    with 1 compute thread on 2 Zen 3 vCPUs, O_DIRECT reads of opt-1.3b's disk part ran at
    0.9-1.5 GB/s inside the engine against 3.3 alone, and a second thread of matmuls in one process
    cut a read stream from 3.4 to 1.9-2.3 GB/s, restored to 3.3-3.6 once that thread set 1."""
    return max(1, _spare_cores()) if device.type == "cpu" else None


def _set_torch_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


class BudgetExceeded(ConfigError):
    pass


class OffloadDiskError(ConfigError):
    """The offload directory failed us (full, removed, read-only): retrying the batch cannot help."""


def offload_error(e: OSError, path: str, doing: str, nbytes: int, tiers: "Tiers") -> OffloadDiskError:
    """A message that names the directory, says what was being written and how much it needs."""
    d = os.path.dirname(path)
    used = tiers.stats["disk"].used
    if e.errno == errno.ENOSPC:
        try:
            free = f"{shutil.disk_usage(d).free / 1e6:.1f} MB free now"
        except OSError:
            free = "free space unknown"
        return OffloadDiskError(
            f"the offload directory {d} is full ({free}) while {doing}: this engine needs "
            f"{used / 1e6:.1f} MB there so far ({nbytes / 1e6:.1f} MB for this file); free space, point --offload-dir "
            "at a larger disk, or move weights/cache to host memory (--percent / --cpu-mem)")
    if e.errno in (errno.ENOENT, errno.ESTALE):
        return OffloadDiskError(f"the offload directory {d} was removed while {doing}; recreate it and rerun "
                                "(finished batches are in the request cache)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OffloadDiskError(f"the offload directory {d} is not writable ({e.strerror}) while {doing}; "
                                "make it writable or point --offload-dir elsewhere, then rerun")
    return OffloadDiskError(f"I/O error in the offload directory {d} while {doing}: {e}")


@dataclass
class TierStats:
    name: str
    budget: int | None
    used: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reserve(self, nbytes: int, what: str) -> None:
        with self.lock:
            if self.budget is not None and self.used + nbytes > self.budget:
                raise BudgetExceeded(
                    f"the {self.name} tier would need {(self.used + nbytes) / 1e6:.1f} MB for {what} "
                    f"but its budget is {self.budget / 1e6:.1f} MB: raise the budget, lower the batch size, "
                    f"or move more weights/cache to a lower tier")
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.used -= nbytes


HUGE_PAGE = 2 << 20


def aligned_host_buffer(nbytes: int) -> torch.Tensor:
    """Page-aligned uint8 host tensor (anonymous mmap), usable as an O_DIRECT read target. From 2 MB
    it asks the kernel for transparent huge pages (most Linux boxes grant them only on request).
    Speed: the 4-bit loop reading weights from memory ran 1.02-1.18x (median ~1.05x) faster on 2 MB
    pages (2 Zen 4 cores, one row, 8192 x 2048 and 2048 x 8192), and a first touch faults once per
    2 MB instead of once per 4 KB."""
    n = max(align_up(nbytes), ALIGN)
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: shared ones are shmem
    if n >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without THP: plain pages
            pass
    t = torch.frombuffer(buf, dtype=torch.uint8)
    t._mmap_owner = buf  # keep the mapping alive as long as the tensor
    return t


class Tiers:
    """Allocation on the three tiers; all engine memory goes through here so peaks are exact."""

    def __init__(self, device: torch.device, offload_dir: str | None, budget_gpu: int | None,
                 budget_cpu: int | None, budget_disk: int | None, pin_memory: bool = True,
                 io_threads: int = 4):
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.pin = pin_memory and self.on_cuda
        self.stats = {"gpu": TierStats("gpu", budget_gpu), "cpu": TierStats("cpu", budget_cpu),
                      "disk": TierStats("disk", budget_disk)}
        self.offload_dir = offload_dir
        # Speed: the workers' torch thread count is set once, where they start (see io_thread_torch_threads)
        worker_threads = io_thread_torch_threads(device)
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="flexgen-io",
                                       initializer=_set_torch_threads, initargs=(worker_threads,))
        # chunk reads get their own pool: a load task in `pool` waits on them, so sharing could deadlock
        self.chunk_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="flexgen-read",
                                             initializer=_set_torch_threads, initargs=(worker_threads,))
        self.bytes_moved: dict[str, int] = {}
        self.page_cache_fallback = 0
        self._moved_lock = threading.Lock()
        self._files: list[DiskFile] = []
        self.on_close: list = []  # callables run by close() (e.g. dropping the shared host weights)
        # Host buffers given back by free_buffer, for the next alloc of the same tier and size
        # (the KV cache blocks of the next run): see free_buffer
        self._kept: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._kept_lock = threading.Lock()

    # ---- accounting ------------------------------------------------------------------------
    def count(self, link: str, nbytes: int) -> None:
        with self._moved_lock:
            self.bytes_moved[link] = self.bytes_moved.get(link, 0) + nbytes

    def peaks(self) -> dict[str, int]:
        return {k: v.peak for k, v in self.stats.items()}

    def reset_peaks(self) -> None:
        for s in self.stats.values():
            s.peak = s.used

    # ---- allocation ------------------------------------------------------------------------
    def alloc(self, tier: str, nbytes: int, what: str, aligned: bool = False) -> torch.Tensor:
        """uint8 buffer on "gpu" (compute device) or "cpu" (host)."""
        self.stats[tier].reserve(nbytes, what)
        kept = self._take_kept(tier, nbytes) if self._keeps(tier, nbytes) else None
        if kept is not None:
            return kept
        if tier == "gpu" and self.on_cuda:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if self.pin and tier == "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if aligned or nbytes >= HUGE_PAGE:  # (large buffers: for the huge pages)
            return aligned_host_buffer(nbytes)[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8)

    def free(self, tier: str, nbytes: int) -> None:
        self.stats[tier].release(nbytes)

    def free_buffer(self, tier: str, buf: torch.Tensor, nbytes: int) -> None:
        """free(), keeping a large host buffer (from alloc, never exposed elsewhere) for the next
        alloc of the same tier and size: the next run's KV cache blocks. Speed: on a VM, memory the
        process has not touched yet costs ~1.6 ms per MB to fault in (the host backs it; touched, it
        costs 0.04): an opt-1.3b 32x8 block run wrote its fresh prefill cache at 18 ms per block
        instead of 0.8 (3.5 s per run). Kept bytes stay within what this tier held at once before,
        and are dropped when an allocation of another size would need the room."""
        self.free(tier, nbytes)
        if not self._keeps(tier, nbytes):
            return
        st = self.stats[tier]
        with self._kept_lock:
            if self._kept_bytes(tier) + nbytes <= st.peak:
                self._kept.setdefault((tier, nbytes), []).append(buf)

    def _keeps(self, tier: str, nbytes: int) -> bool:
        """Are buffers of this tier and size ones free_buffer keeps: large mapped host buffers? (CUDA
        memory has its own caching allocator; pinned pages are not slow to fault in that way.)"""
        return nbytes >= HUGE_PAGE and not (tier == "gpu" and self.on_cuda) and not (self.pin and tier == "cpu")

    def _kept_bytes(self, tier: str) -> int:
        return sum(n * len(v) for (t, n), v in self._kept.items() if t == tier)

    def _take_kept(self, tier: str, nbytes: int) -> torch.Tensor | None:
        """A kept buffer of exactly this tier and size; on a miss, the tier's kept buffers are let go
        when they and the new one would not fit its budget together (physical memory stays within it)."""
        with self._kept_lock:
            bufs = self._kept.get((tier, nbytes))
            if bufs:
                return bufs.pop()
            st = self.stats[tier]
            if st.budget is not None and st.used + self._kept_bytes(tier) > st.budget:
                for key in [k for k in self._kept if k[0] == tier]:
                    del self._kept[key]
        return None

    def disk_file(self, name: str, nbytes: int, what: str) -> "DiskFile":
        if self.offload_dir is None:
            raise ConfigError("the policy puts data on disk: pass offload_dir (--offload-dir) for the disk tier")
        self.stats["disk"].reserve(align_up(nbytes), what)
        try:
            free = shutil.disk_usage(self.offload_dir).free
        except OSError as e:
            self.stats["disk"].release(align_up(nbytes))
            raise offload_error(e, os.path.join(self.offload_dir, name), f"creating {name}", nbytes, self) from e
        if free < align_up(nbytes):  # files are sparse: without this a full disk shows up mid-write
            self.stats["disk"].release(align_up(nbytes))
            raise OffloadDiskError(
                f"the offload directory {self.offload_dir} has {free / 1e6:.1f} MB free but {what} needs "
                f"{align_up(nbytes) / 1e6:.1f} MB there ({(self.stats['disk'].used + align_up(nbytes)) / 1e6:.1f} MB "
                "for this engine so far); free space, point --offload-dir at a larger disk, or move weights/cache "
                "to host memory (--percent / --cpu-mem)")
        try:
            f = DiskFile(os.path.join(self.offload_dir, name), nbytes, self)
        except BaseException:
            self.stats["disk"].release(align_up(nbytes))
            raise
        self._files.append(f)
        return f

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.chunk_pool.shutdown(wait=True)
        with self._kept_lock:
            self._kept.clear()
        for f in list(self._files):
            f.remove()
        for fn in self.on_close:
            fn()
        self.on_close.clear()


class DiskFile:
    """A file on the disk tier: buffered writes, O_DIRECT reads into page-aligned buffers."""

    def __init__(self, path: str, nbytes: int, tiers: Tiers, create: bool = True):
        self.path, self.nbytes, self.tiers = path, nbytes, tiers
        self.size = align_up(nbytes)
        self.removed = False
        try:
            if create:
                with open(path, "wb") as f:
                    f.truncate(self.size)  # sparse: a full disk shows up at write time
            self.wfd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise offload_error(e, path, f"creating {os.path.basename(path)}", self.size, tiers) from e
        try:
            self.rfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            self.direct = hasattr(os, "O_DIRECT")
        except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
            self.rfd = os.open(path, os.O_RDONLY)
            self.direct = False

    def write(self, offset: int, data: torch.Tensor) -> None:
        """Write a host uint8 tensor at offset (buffered; O_DIRECT readers see it coherently)."""
        mv = memoryview(data.contiguous().numpy())
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self.wfd, mv[done:], offset + done)
        except OSError as e:
            raise offload_error(e, self.path, f"writing {os.path.basename(self.path)}", self.size, self.tiers) from e

    def flush(self) -> None:
        """Push written data to disk and drop it from the page cache so later reads are real."""
        try:
            os.fsync(self.wfd)
        except OSError as e:  # delayed allocation: ENOSPC may only surface here
            raise offload_error(e, self.path, f"flushing {os.path.basename(self.path)}", self.size, self.tiers) from e
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.wfd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_into(self, offset: int, dst: torch.Tensor, parallel: bool = True) -> None:
        """Fill host uint8 `dst` from file[offset : offset+len(dst)].

        Fast path: dst page-aligned, offset aligned -> O_DIRECT straight into dst (reads past len(dst)
        up to the next 4 KB boundary, so callers give dst that slack; see `aligned_host_buffer`).
        """
        n = dst.numel()
        if n == 0:
            return
        self.tiers.count("disk->cpu", n)
        ok = (self.direct and offset % ALIGN == 0 and dst.data_ptr() % ALIGN == 0
              and dst.untyped_storage().nbytes() - (dst.data_ptr() - dst.untyped_storage().data_ptr())
              >= align_up(n))
        if not ok:
            self._read_bounced(offset, dst)
            return
        base = dst.data_ptr() - dst.untyped_storage().data_ptr()
        full = torch.empty(0, dtype=torch.uint8).set_(dst.untyped_storage(), base, (align_up(n),))
        mv = memoryview(full.numpy())
        spans = [(o, min(CHUNK, len(mv) - o)) for o in range(0, len(mv), CHUNK)]
        if parallel and len(spans) > 1:
            # Several outstanding requests keep the device queue busy (NVMe needs queue depth).
            list(self.tiers.chunk_pool.map(lambda s: self._pread(mv[s[0]:s[0] + s[1]], offset + s[0]), spans))
        else:
            for o, m in spans:
                self._pread(mv[o:o + m], offset + o)

    def _pread(self, mv: memoryview, offset: int) -> None:
        done = 0
        while done < len(mv):
            got = os.preadv(self.rfd, [mv[done:]], offset + done)
            if got <= 0:
                raise IOError(f"short read from {self.path} at {offset + done}")
            done += got

    def _read_bounced(self, offset: int, dst: torch.Tensor) -> None:
        n = dst.numel()
        if self.direct:
            start = offset - offset % ALIGN
            bounce = aligned_host_buffer(align_up(offset + n) - start)
            self._pread(memoryview(bounce.numpy()), start)
            dst.copy_(bounce[offset - start: offset - start + n])
            return
        self.tiers.page_cache_fallback += 1
        self._pread(memoryview(dst.numpy()), offset)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.rfd, offset, n, os.POSIX_FADV_DONTNEED)

    def remove(self) -> None:
        # once only: a second close would hit whatever file reused the descriptor numbers, and a
        # second release would undercount the disk tier (cache blocks remove their files, then
        # Tiers.close removes every file it handed out)
        if self.removed:
            return
        self.removed = True
        if self in self.tiers._files:
            self.tiers._files.remove(self)
        for fd in (self.wfd, self.rfd):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self.tiers.stats["disk"].release(self.size)
