"""The process group and the messages between stages.

Control messages are JSON (never pickle) in uint8 tensors, sent as (length, bytes); hidden states
are raw tensors of a shape announced in the JSON header. Every receive that fails (a peer that died
closes its sockets, so gloo raises at once; a peer that hangs trips the process-group timeout)
becomes a `PipelineError` naming the stage, so every rank exits with a clear error instead of
hanging."""
from __future__ import annotations

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..engine.config import ConfigError

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PipelineError(RuntimeError):
    """A peer stage died, hung or disagreed; this rank stops too."""


def init_process_group(device: torch.device, timeout_s: float) -> tuple[int, int]:
    """Join (or reuse) the default process group; (rank, world_size). NCCL on CUDA, gloo on CPU."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise ConfigError(
            f"distributed=True needs the process-group environment that torchrun sets ({', '.join(missing)} "
            "missing); launch every stage with `torchrun --nproc-per-node N script.py` (one host) or "
            "`torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT ...` (several), "
            "or drop distributed=True")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


class Channel:
    """Point-to-point and broadcast messages of one pipeline; `device` is where tensors travel
    (the GPU under NCCL, host memory under gloo)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.pending: list = []  # isend works whose buffers must stay alive until they complete

    def _fail(self, what: str, peer: int | str, err: Exception) -> PipelineError:
        return PipelineError(f"stage {self.rank}: {what} stage {peer} failed ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]}); a stage died or hung, so this stage stops too. "
                             "Check the first failing rank's log.")

    # ---- point to point ------------------------------------------------------------------
    def send_tensor(self, t: torch.Tensor, dst: int) -> None:
        t = t.to(self.device).contiguous()
        try:
            self.pending.append((dist.isend(t, dst), t))
        except RuntimeError as e:
            raise self._fail("sending to", dst, e) from e

    def recv_tensor(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            dist.recv(t, src)
        except RuntimeError as e:
            raise self._fail("receiving from", src, e) from e
        return t

    def send_json(self, obj, dst: int) -> None:
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        self.send_tensor(torch.tensor([data.numel()], dtype=torch.int64), dst)
        self.send_tensor(data, dst)

    def recv_json(self, src: int):
        n = int(self.recv_tensor((1,), torch.int64, src)[0])
        return json.loads(bytes(self.recv_tensor((n,), torch.uint8, src).cpu().numpy()).decode())

    def flush(self) -> None:
        """Wait for every send this rank started (before their buffers may be reused)."""
        try:
            for work, _ in self.pending:
                work.wait()
        except RuntimeError as e:
            raise self._fail("sending to", "peer", e) from e
        finally:
            self.pending.clear()

    def reap(self) -> None:
        """Drop sends that already completed (keeps the pending list short)."""
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]

    # ---- collectives ---------------------------------------------------------------------
    def broadcast_json(self, obj=None, src: int = 0):
        """Rank `src` sends `obj`; every rank returns it."""
        try:
            if self.rank == src:
                data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(self.device)
                n = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
            else:
                n = torch.zeros(1, dtype=torch.int64, device=self.device)
            dist.broadcast(n, src)
            if self.rank != src:
                data = torch.empty(int(n[0]), dtype=torch.uint8, device=self.device)
            dist.broadcast(data, src)
        except RuntimeError as e:
            raise self._fail("broadcast with", src, e) from e
        return json.loads(bytes(data.cpu().numpy()).decode()) if self.rank != src else obj

    def all_gather_json(self, obj) -> list:
        """Every rank's `obj`, in rank order (JSON: for start-up agreement checks)."""
        out = []
        for src in range(self.world):
            out.append(self.broadcast_json(obj if src == self.rank else None, src))
        return out
