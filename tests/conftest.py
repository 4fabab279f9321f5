"""Shared fixtures: tiny OPT checkpoints written in the standard HF layout (random weights, locally
trained tokenizer), so the real loading code is what the tests exercise."""
from __future__ import annotations

import os

import pytest

from flexgen_helm.tiny import TinyOPT, build_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> str:
    """Pre-LN OPT (the layout of every size but 350m), safetensors, with tokenizer."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-opt")), TinyOPT())


@pytest.fixture(scope="session")
def tiny_opt_350m_like(tmp_path_factory) -> str:
    """Post-LN with word_embed_proj_dim != hidden, like opt-350m; saved as a sharded .bin checkpoint."""
    cfg = TinyOPT(num_layers=2, hidden=64, num_heads=4, ffn=128, word_embed_proj_dim=32, post_ln=True, seed=1)
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-350m")), cfg, fmt="bin",
                                 max_shard_size="100KB", tokenizer=False)


@pytest.fixture(scope="session")
def tiny_opt_sharded(tmp_path_factory) -> str:
    """Sharded safetensors with an index file."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-sharded")), TinyOPT(seed=2),
                                 max_shard_size="150KB", tokenizer=False)
