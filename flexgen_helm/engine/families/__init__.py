"""The decoder families the engine runs. Each family is one small table (its own file): HF tensor
names by role, the public sizes `dummy:NAME` accepts, tokenizer defaults, and how its config.json
maps onto `ModelSpec`. Adding a family means adding a table here."""
from __future__ import annotations

import re

from ..config import ConfigError
from .base import Family
from . import llama, mistral, opt, qwen2, qwen3

FAMILIES: dict[str, Family] = {f.name: f for f in (opt.FAMILY, llama.FAMILY, mistral.FAMILY, qwen2.FAMILY,
                                                  qwen3.FAMILY)}


def family_for_config(config: dict, name: str) -> Family:
    mt = config.get("model_type", "opt")
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ConfigError(f"{name}: model_type {mt!r} is not supported; supported model types: {supported}")


def public_names() -> dict[str, list[str]]:
    """Family -> the public sizes `dummy:NAME` (and the policy search) accept."""
    return {f.name: list(f.sizes) for f in FAMILIES.values()}


def canonical_name(name: str) -> str:
    """'facebook/opt-iml-max-30b' -> 'opt-30b', 'meta-llama/Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'."""
    base = name.split("/")[-1].lower()
    base = re.sub(r"-iml(-max)?", "", base)
    base = re.sub(r"^meta-", "", base)
    base = re.sub(r"-(hf|instruct|chat|base|it)$", "", base)
    return base


def public_config(name: str) -> dict:
    key = canonical_name(name)
    for fam in FAMILIES.values():
        if key in fam.sizes:
            return dict(fam.sizes[key])
        if key in fam.aliases:
            return dict(fam.sizes[fam.aliases[key]])
    listed = "; ".join(f"{f}: {', '.join(n)}" for f, n in public_names().items())
    raise ConfigError(f"unknown model {name!r}: use a checkpoint directory with a HF config.json, or one of "
                      f"the public sizes ({listed})")


__all__ = ["FAMILIES", "Family", "family_for_config", "public_config", "public_names", "canonical_name"]
