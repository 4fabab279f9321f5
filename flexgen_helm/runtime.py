"""`load_engine`: an Engine under a concrete policy, or under the one the policy search picks
("auto") for the workload's prompt and generation lengths. The search sits here, one level above
the engine, so the engine never imports it."""
from __future__ import annotations

import torch

from .engine.config import ConfigError, MemoryBudget, Policy, default_dtype
from .engine.engine import Engine, resolve_device
from .engine.model_spec import load_spec


def load_engine(model: str, policy: Policy | str = "auto", *, device: str = "cpu", dtype: torch.dtype | None = None,
                offload_dir: str | None = None, budget: MemoryBudget | None = None, prompt_len: int = 512,
                gen_len: int = 32, allow_compression: bool = False, shared_host_weights: bool = False) -> Engine:
    if isinstance(policy, str):
        if policy != "auto":
            raise ConfigError(f"policy must be a Policy or 'auto', got {policy!r}")
        policy = resolve_policy(model, device=device, dtype=dtype, budget=budget, prompt_len=prompt_len,
                                gen_len=gen_len, allow_compression=allow_compression)
    return Engine.from_pretrained(model, policy=policy, device=device, dtype=dtype, offload_dir=offload_dir,
                                  budget=budget, prompt_len=prompt_len, gen_len=gen_len,
                                  shared_host_weights=shared_host_weights)


def resolve_policy(model: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                   budget: MemoryBudget | None = None, prompt_len: int = 512, gen_len: int = 32,
                   allow_compression: bool = False) -> Policy:
    """The policy search's choice for this model, machine (measured profile) and budget."""
    from .policy.search import auto_policy
    dev = resolve_device(device)
    dtype = dtype or getattr(torch, default_dtype(dev.type))
    return auto_policy(load_spec(model), prompt_len=prompt_len, gen_len=gen_len, budget=budget or MemoryBudget(),
                       device=dev.type, dtype_bytes=dtype.itemsize, allow_compression=allow_compression)
