"""HELM over a pipelined model: `torchrun --nproc-per-node N -m flexgen_helm run ...`.

Rank 0 runs HELM and the batch runner as usual; whenever its client builds an engine, it first
tells the other ranks (a JSON `build` message with the engine's arguments), so every rank builds
its stage of the same model, and the other ranks then serve that engine until rank 0 closes it.
When rank 0 is done it sends `exit`."""
from __future__ import annotations

import os
from typing import Any

import torch

from ..engine.config import MemoryBudget, Policy
from .comm import Channel, init_process_group


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _channel(device: str = "cpu") -> Channel:
    dev = torch.device(device)
    rank, world = init_process_group(dev, timeout_s=float(os.environ.get("FLEXGEN_PIPELINE_TIMEOUT_S", "1800")))
    return Channel(rank, world, dev if dev.type == "cuda" else torch.device("cpu"))


def _local_device(device: str) -> str:
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def build_engine(model_path: str, policy: Policy, device: str, dtype: torch.dtype | None, offload_dir: str | None,
                 budget: MemoryBudget, prompt_len: int, gen_len: int) -> Any:
    """Rank 0: announce the engine to the serving ranks, then build stage 0 with them."""
    from ..engine.engine import Engine
    msg = {"op": "build", "model": model_path, "policy": policy.to_dict(), "device": device,
           "dtype": str(dtype).replace("torch.", "") if dtype is not None else None, "offload_dir": offload_dir,
           "budget": [budget.gpu, budget.cpu, budget.disk], "prompt_len": prompt_len, "gen_len": gen_len}
    _channel(device).broadcast_json(msg)
    eng = Engine.from_pretrained(model_path, policy=policy, device=_local_device(device), dtype=dtype,
                                 offload_dir=offload_dir, budget=budget, prompt_len=prompt_len, gen_len=gen_len,
                                 distributed=True)
    from helm.common.hierarchical_logger import hlog
    hlog(f"flexgen: pipeline of {eng.world} stages: {eng.split.describe()}")
    return eng


def finish(device: str = "cpu") -> None:
    """Rank 0, after its last engine is closed: let the serving ranks exit."""
    _channel(device).broadcast_json({"op": "exit"})


def serve_forever(device: str = "cpu") -> int:
    """Ranks > 0: build each engine rank 0 announces and serve it, until `exit`."""
    from ..engine.engine import Engine
    ch = _channel(device)
    while True:
        msg = ch.broadcast_json(None)
        if msg["op"] == "exit":
            return 0
        dtype = getattr(torch, msg["dtype"]) if msg["dtype"] else None
        if msg["offload_dir"]:
            os.makedirs(msg["offload_dir"], exist_ok=True)
        eng = Engine.from_pretrained(msg["model"], policy=Policy.from_dict(msg["policy"]),
                                     device=_local_device(msg["device"]), dtype=dtype, offload_dir=msg["offload_dir"],
                                     budget=MemoryBudget(*msg["budget"]), prompt_len=msg["prompt_len"],
                                     gen_len=msg["gen_len"], distributed=True)
        eng.serve()
