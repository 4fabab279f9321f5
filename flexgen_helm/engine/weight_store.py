"""Weights resident on the three tiers, and the double-buffered loader that stages the next layer
on the compute device while the current one runs.

Each scheduling layer is one flat byte buffer (see placement.py); loading it means copying its
host segment and reading its disk segment into a staging buffer, then viewing tensors at their
offsets (and dequantizing compressed ones once per layer per step, reused by all micro-batches).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from .config import Policy
from .model_spec import ModelSpec
from .placement import LayerLayout, layer_layout
from .tiers import ALIGN, DiskFile, Tiers, align_up
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
                 held: "set[int] | None" = None):
        """`held`: the scheduling layers this store keeps (a pipeline stage's range); default all."""
        self.spec, self.policy, self.tiers, self.dtype = spec, policy, tiers, dtype
        es = torch.empty(0, dtype=dtype).element_size()
        self.layouts: list[LayerLayout] = [layer_layout(spec, j, es, policy) for j in range(spec.num_layers + 2)]
        self.segments = [lay.segments(policy) if held is None or j in held else (0, 0, 0)
                         for j, lay in enumerate(self.layouts)]
        if held is not None:  # layers of other stages: nothing stored, never staged
            self.layouts = [lay if j in held else LayerLayout((), 0, 0) for j, lay in enumerate(self.layouts)]
        self.streamed = policy.w_gpu_percent < 100
        on_cuda = tiers.on_cuda
        disk_total = sum(align_up(db) for _, _, db in self.segments if db)
        self.disk: DiskFile | None = tiers.disk_file("weights.bin", disk_total, "weights") if disk_total else None
        self.gpu_seg, self.cpu_seg, self.disk_off = [], [], []
        off = 0
        for j, lay in enumerate(self.layouts):
            flat = self._build_flat(reader, j, lay) if lay.slots else torch.zeros(0, dtype=torch.uint8)
            gb, cb, db = self.segments[j]
            g = tiers.alloc("gpu", gb, f"weights of layer {j}") if gb else None
            if g is not None:
                g.copy_(flat[:gb])
            c = tiers.alloc("cpu", cb, f"weights of layer {j}") if cb else None
            if c is not None:
                c.copy_(flat[gb:gb + cb])
            if db:
                self.disk.write(off, flat[gb + cb:])
            self.gpu_seg.append(g)
            self.cpu_seg.append(c)
            self.disk_off.append(off)
            off += align_up(db) if db else 0
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
            max_dense = max(l.dense_nbytes for l in self.layouts)
            self.dequant = [tiers.alloc("gpu", max_dense, "dequantized weights") for _ in range(2)]
        self._slot = 0
        self._lock = threading.Lock()
        if on_cuda:
            self.stream = torch.cuda.Stream(device=tiers.device)
            self.free_events = [None, None]

    def _build_flat(self, reader, j: int, lay: LayerLayout) -> torch.Tensor:
        """The layer's bytes on the host, quantized where the policy compresses weights."""
        flat = torch.zeros(lay.nbytes, dtype=torch.uint8)
        tensors = {ref.role: t for ref, t in iter_layer_tensors(reader, self.spec.layer_tensors(j), self.dtype)}
        for slot in lay.slots:
            t = tensors[slot.role]
            dst = flat[slot.offset: slot.offset + slot.nbytes]
            if slot.kind == "dense":
                dst.copy_(t.contiguous().view(-1).view(torch.uint8))
            else:
                from . import compression
                compression.to_buffer(t, self.policy.comp_weight_config, out=dst)
        return flat

    # ---- loading ---------------------------------------------------------------------------
    def submit(self, j: int) -> Future:
        """Start staging layer j; the future yields its StagedLayer."""
        with self._lock:
            slot = self._slot
            self._slot ^= 1
        if self.tiers.on_cuda and self.free_events[slot] is not None:
            self.stream.wait_event(self.free_events[slot])  # slot's previous layer finished computing
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
                # compressed: dequantized once per layer per step, shared by every micro-batch
                from . import compression
                n = torch.Size(s.shape).numel() * self.dtype.itemsize
                dst = _view(self.dequant[slot], deq_off, n, self.dtype, s.shape)
                compression.from_buffer(buf[s.offset:s.offset + s.nbytes], s.shape, self.policy.comp_weight_config,
                                        self.dtype, out=dst)
                deq_off += n
                out[s.role] = dst
            ready = None
            if self.tiers.on_cuda:
                ready = torch.cuda.Event()
                ready.record(self.stream)
                self.stream.synchronize()  # the pinned bounce slot may be refilled two layers later
        return StagedLayer(out, slot, ready)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
