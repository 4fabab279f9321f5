"""Weights resident on the three tiers, and the double-buffered loader that stages the next layer
on the compute device while the current one runs.

Each scheduling layer is one flat byte buffer (see placement.py); loading it means copying its
host segment and reading its disk segment into a staging buffer, then viewing tensors at their
offsets (and dequantizing compressed ones once per layer per step, reused by all micro-batches).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from . import compression
from .config import Policy
from .model_spec import ModelSpec
from .placement import LayerLayout, layer_layout
from .tiers import ALIGN, DiskFile, Tiers, align_up, copies_share_compute_cores
from .weights import iter_layer_tensors


@dataclass
class StagedLayer:
    """One scheduling layer's weights, ready on the compute device."""

    weights: dict[str, torch.Tensor]  # role -> tensor
    slot: int  # staging slot to release once every micro-batch used it
    ready: "torch.cuda.Event | None" = None  # CUDA: the copy stream's event the compute must wait on


def _view(buf: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
    return buf[offset: offset + nbytes].view(dtype).view(shape)


class WeightStore:
    def __init__(self, spec: ModelSpec, policy: Policy, tiers: Tiers, reader, dtype: torch.dtype,
                 shared_dir: str | None = None, source_id: str | None = None, held: "set[int] | None" = None):
        """shared_dir: map the host-tier segments from one file there, shared with every engine of
        this host that has the same `source_id` (the weights' identity), policy and dtype.
        `held`: the scheduling layers this store keeps (a pipeline stage's range); default all."""
        self.spec, self.policy, self.tiers, self.dtype = spec, policy, tiers, dtype
        es = torch.empty(0, dtype=dtype).element_size()
        self.layouts: list[LayerLayout] = [layer_layout(spec, j, es, policy, cpu_compute=not tiers.on_cuda)
                                           for j in range(spec.num_layers + 2)]
        self.segments = [lay.segments(policy) if held is None or j in held else (0, 0, 0)
                         for j, lay in enumerate(self.layouts)]
        if held is not None:  # layers of other stages: nothing stored, never staged
            self.layouts = [lay if j in held else LayerLayout((), 0, 0) for j, lay in enumerate(self.layouts)]
        self.streamed = policy.w_gpu_percent < 100
        on_cuda = tiers.on_cuda
        disk_total = sum(align_up(db) for _, _, db in self.segments if db)
        self.disk: DiskFile | None = tiers.disk_file("weights.bin", disk_total, "weights") if disk_total else None
        shared = self._open_shared(shared_dir, source_id)
        self.shared_built = shared is not None and shared.needs_build  # this engine wrote the shared file
        self.gpu_seg, self.cpu_seg, self.disk_off = [], [], []
        off = cpu_off = 0
        cpu_offs = []
        for j, lay in enumerate(self.layouts):
            gb, cb, db = self.segments[j]
            skip_cpu = shared is not None and not shared.needs_build  # another engine wrote them
            flat = self._build_flat(reader, j, lay) if gb or db or (cb and not skip_cpu) else None
            g = tiers.alloc("gpu", gb, f"weights of layer {j}") if gb else None
            if g is not None:
                g.copy_(flat[:gb])
            c = None
            if cb and shared is not None:
                if shared.needs_build:
                    shared.write(cpu_off, flat[gb:gb + cb])
            elif cb:
                c = tiers.alloc("cpu", cb, f"weights of layer {j}")
                c.copy_(flat[gb:gb + cb])
            if db:
                self.disk.write(off, flat[gb + cb:])
            self.gpu_seg.append(g)
            self.cpu_seg.append(c)
            self.disk_off.append(off)
            cpu_offs.append(cpu_off)
            off += align_up(db) if db else 0
            cpu_off += align_up(cb) if cb else 0
        if shared is not None:
            mapped = shared.finish()
            self.cpu_seg = [mapped[o:o + cb] if cb else None for o, (_, cb, _) in zip(cpu_offs, self.segments)]
        if self.disk is not None:
            self.disk.flush()  # later reads must come from the disk, not from pages we just wrote
        max_stored = max(l.nbytes for l in self.layouts)
        max_disk = max(db for _, _, db in self.segments)
        self.staging: list[torch.Tensor] = []
        self.bounce: list[torch.Tensor] = []
        if self.streamed:
            self.staging = [tiers.alloc("gpu", align_up(max_stored + ALIGN), "weight staging", aligned=True)
                            for _ in range(2)]
            if on_cuda and max_disk:
                self.bounce = [tiers.alloc("cpu", align_up(max_disk + ALIGN), "disk bounce", aligned=True)
                               for _ in range(2)]
        self.dequant: list[torch.Tensor] = []
        if policy.compress_weight:
            max_dense = max(l.dequant_nbytes for l in self.layouts)
            self.dequant = [tiers.alloc("gpu", max_dense, "dequantized weights") for _ in range(2)]
        self._slot = 0
        self._lock = threading.Lock()
        in_place = {"dense", "rows", *compression.FUSED_INT4_KINDS}  # kinds used where they lie
        self._is_static = [not self.streamed and all(s.kind in in_place for s in lay.slots) for lay in self.layouts]
        self._static: dict[int, StagedLayer] = {}
        self.dequant_time = 0.0  # seconds spent dequantizing (I/O threads, overlapped with compute)
        if on_cuda:
            self.stream = torch.cuda.Stream(device=tiers.device)
            self.free_events = [None, None]

    def _open_shared(self, shared_dir: str | None, source_id: str | None):
        """The shared host-tier file (see shared_weights.py), budgeted like host memory; None when
        not asked for or when nothing lives on the host tier."""
        total = sum(align_up(cb) for _, cb, _ in self.segments if cb)
        if shared_dir is None or not total:
            return None
        from .shared_weights import SharedHostFile, shared_key
        if source_id is None:
            raise ValueError("shared host weights need the weights' identity (source_id)")
        # everything that decides the bytes: weights, dtype, placement, compression, kernel layout
        key = shared_key([source_id, str(self.dtype), torch.__version__, torch.backends.cpu.get_cpu_capability(),
                          compression.LAYOUT_VERSION, self.layouts, self.segments, self.policy.compress_weight,
                          self.policy.comp_weight_config])
        self.tiers.stats["cpu"].reserve(total, "shared host weights")  # mapped pages are host memory
        shared = SharedHostFile(shared_dir, key, total)
        self.tiers.on_close.append(shared.close)
        return shared

    def _build_flat(self, reader, j: int, lay: LayerLayout) -> torch.Tensor:
        """The layer's bytes on the host, quantized where the policy compresses weights."""
        flat = torch.zeros(lay.nbytes, dtype=torch.uint8)
        tensors = {ref.role: t for ref, t in iter_layer_tensors(reader, self.spec.layer_tensors(j))}
        for slot in lay.slots:
            t = tensors[slot.role]
            dst = flat[slot.offset: slot.offset + slot.nbytes]
            if slot.kind == "dense":
                dst.copy_(t.to(self.dtype).contiguous().view(-1).view(torch.uint8))
                continue
            # quantized from the checkpoint's own values (fp32 where it has them), not from a bf16
            # rounding of them: the codes then do not depend on the compute dtype
            t = t.float()
            if slot.kind in compression.FUSED_INT4_KINDS:
                compression.FUSED_INT4_KINDS[slot.kind].write(t, self.policy.comp_weight_config, self.dtype, dst)
            else:  # "compressed" and "rows": the [packed | meta] format
                compression.to_buffer(t, self.policy.comp_weight_config, out=dst)
        return flat

    # ---- loading ---------------------------------------------------------------------------
    def submit(self, j: int) -> Future:
        """Start staging layer j; the future yields its StagedLayer."""
        if self._is_static[j]:
            # Speed: weights that stay where they are computed on and need no per-step dequantization
            # are the same views every step. Built once, they cost no I/O-thread work, whose Python
            # would take the GIL each time a torch op on the compute thread lets go of it (measured:
            # a 1x2048 layer norm took 50-350 us instead of 5 in batch-1 decode).
            with self._lock:
                if j not in self._static:
                    self._static[j] = StagedLayer(self._load(j, 0).weights, 0, None)
            fut: Future = Future()
            fut.set_result(self._static[j])
            return fut
        with self._lock:
            slot = self._slot
            self._slot ^= 1
        if self.tiers.on_cuda and self.free_events[slot] is not None:
            self.stream.wait_event(self.free_events[slot])  # slot's previous layer finished computing
        if not self.segments[j][2] and copies_share_compute_cores(self.tiers.device):
            # Speed: where compute has every core, a layer with nothing on disk is copied by the
            # thread that computes on it, when it asks for it. In an I/O thread the copy would run on
            # a core of the compute's OpenMP team (a 2-thread team of its own before the workers
            # set their thread count) and the team's barriers wait on a descheduled thread:
            # opt-125m, block 4x8, weights on the host tier, 2 Zen 3 cores, alternating runs:
            # decode 3.2-3.9 s with the copies in the pool, 2.8-3.3 s here. The cost model
            # charges these copies serially (profile: copy_overlaps_compute False).
            return _OnCaller(lambda: self._load(j, slot))
        return self.tiers.pool.submit(self._load, j, slot)

    def release(self, slot: int) -> None:
        """Called after the last micro-batch used the weights staged in `slot` (CUDA: lets the
        slot be rewritten once the compute queued so far has finished)."""
        if self.tiers.on_cuda:
            ev = torch.cuda.Event()
            ev.record()
            self.free_events[slot] = ev

    def _load(self, j: int, slot: int) -> StagedLayer:
        lay = self.layouts[j]
        gb, cb, db = self.segments[j]
        if not self.streamed:
            buf = self.gpu_seg[j]
        else:
            buf = self.staging[slot]
            ctx = torch.cuda.stream(self.stream) if self.tiers.on_cuda else _null()
            with ctx:
                if gb:
                    buf[:gb].copy_(self.gpu_seg[j], non_blocking=True)
                if cb:
                    buf[gb:gb + cb].copy_(self.cpu_seg[j], non_blocking=True)
                    self.tiers.count("cpu->gpu", cb)
                if db:
                    if self.tiers.on_cuda:
                        host = self.bounce[slot]
                        self.disk.read_into(self.disk_off[j], host[:db])
                        buf[gb + cb:gb + cb + db].copy_(host[:db], non_blocking=True)
                        self.tiers.count("cpu->gpu", db)
                    else:  # compute tier is host memory: read straight into the staging buffer
                        self.disk.read_into(self.disk_off[j], buf[gb + cb:gb + cb + db])
        out = {}
        deq_off = 0
        ctx = torch.cuda.stream(self.stream) if self.tiers.on_cuda else _null()
        with ctx:
            for s in lay.slots:
                if s.kind == "dense":
                    out[s.role] = _view(buf, s.offset, s.nbytes, self.dtype, s.shape)
                    continue
                if s.kind == "rows":  # dequantized row by row at lookup
                    out[s.role] = compression.RowQuantizedTable(buf[s.offset:s.offset + s.nbytes], s.shape,
                                                    self.policy.comp_weight_config, self.dtype)
                    continue
                if s.kind in compression.FUSED_INT4_KINDS:  # multiplied in place by a fused kernel
                    out[s.role] = compression.FUSED_INT4_KINDS[s.kind](buf[s.offset:s.offset + s.nbytes], s.shape,
                                                                       self.policy.comp_weight_config, self.dtype)
                    continue
                # compressed: dequantized once per layer per step, shared by every micro-batch
                t_dq = time.perf_counter()
                n = torch.Size(s.shape).numel() * self.dtype.itemsize
                dst = _view(self.dequant[slot], deq_off, n, self.dtype, s.shape)
                compression.from_buffer(buf[s.offset:s.offset + s.nbytes], s.shape, self.policy.comp_weight_config,
                                        self.dtype, out=dst)
                deq_off += n
                out[s.role] = dst
                with self._lock:
                    self.dequant_time += time.perf_counter() - t_dq
            _fuse(out, "qkv", ("q", "k", "v"))
            _fuse(out, "gate_up", ("gate", "up"))
            ready = None
            if self.tiers.on_cuda:
                ready = torch.cuda.Event()
                ready.record(self.stream)
                self.stream.synchronize()  # the pinned bounce slot may be refilled two layers later
        return StagedLayer(out, slot, ready)


class _OnCaller(Future):
    """A load run by the first thread that asks for its result (the scheduler's io_wait times it)."""

    def __init__(self, load) -> None:
        super().__init__()
        self._load = load

    def result(self, timeout: float | None = None):
        if not self.done():
            try:
                self.set_result(self._load())
            except BaseException as e:  # noqa: BLE001  re-raised by result() below, as a pool future would
                self.set_exception(e)
        return super().result(timeout)


def _adjacent_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The parts as one tensor concatenated along dim 0, when they already lie back to back in
    one buffer (no copy); None otherwise."""
    if not all(isinstance(p, torch.Tensor) for p in parts):
        return None  # fused-kernel 4-bit weights stay separate
    first = parts[0]
    end = first.data_ptr()
    for p in parts:
        if p.data_ptr() != end or not p.is_contiguous() or p.shape[1:] != first.shape[1:] or p.dtype != first.dtype:
            return None
        end += p.numel() * p.element_size()
    shape = (sum(p.shape[0] for p in parts),) + tuple(first.shape[1:])
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), first.storage_offset(), shape, first.stride())


def _fuse(w: dict[str, torch.Tensor], fused: str, roles: tuple[str, ...]) -> None:
    """Add `fused.weight` (+ `.bias`) views over adjacent per-role tensors (4-bit loop weights: one
    weight over the parts, wherever they lie), for one matmul instead of several; the per-role
    entries stay. Skipped unless weights (and biases, when present) fuse."""
    if not all(f"{r}.weight" in w for r in roles):
        return
    parts = [w[f"{r}.weight"] for r in roles]
    weight = (compression.GroupInt4Weight.stacked(parts) if isinstance(parts[0], compression.GroupInt4Weight)
              else _adjacent_view(parts))
    has_bias = [f"{r}.bias" in w for r in roles]
    if weight is None or (any(has_bias) and not all(has_bias)):
        return
    if all(has_bias):
        bias = _adjacent_view([w[f"{r}.bias"] for r in roles])
        if bias is None:
            return
        w[f"{fused}.bias"] = bias
    w[f"{fused}.weight"] = weight


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
