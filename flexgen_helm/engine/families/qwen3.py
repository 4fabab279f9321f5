"""Qwen3 (dense): the Llama-style block with RMSNorm on q and k per head (before RoPE), an explicit
head_dim (128 by default, not hidden/heads), optional attention biases."""
from __future__ import annotations

from .base import LLAMA_STYLE_NAMES, Family, rotary_decoder
from .qwen2 import size


def _parse(cfg: dict, name: str) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    return rotary_decoder(cfg, name, qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True,
                          sliding_window=window, head_dim_default=128)


def _size(hidden: int, layers: int, heads: int, ffn: int, tie: bool) -> dict:
    return size(hidden, layers, heads, 8, ffn, 151936, tie, "qwen3", head_dim=128, max_position_embeddings=40960)


_SIZES = {
    "qwen3-0.6b": _size(1024, 28, 16, 3072, True),
    "qwen3-1.7b": _size(2048, 28, 16, 6144, True),
    "qwen3-4b": _size(2560, 36, 32, 9728, True),
    "qwen3-8b": _size(4096, 36, 32, 12288, False),
    "qwen3-14b": _size(5120, 40, 40, 17408, False),
    "qwen3-32b": _size(5120, 64, 64, 25600, False),
}


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    tensor_names=LLAMA_STYLE_NAMES,
    sizes=_SIZES,
    hub_ids={n: "Qwen/Qwen" + n[len("qwen"):].upper() + "-Base" for n in _SIZES},  # the base models
    text_tokens={"*": ("", "<|endoftext|>")},
    add_bos=False,
    parse=_parse,
)
