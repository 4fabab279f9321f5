"""Llama 1/2/3/3.1/3.2: the Llama-style block (RMSNorm, gated SiLU MLP, rotary positions, GQA
from Llama-2-70B and Llama 3 on; llama3 rope scaling from 3.1; tied embeddings in 3.2 1B/3B)."""
from __future__ import annotations

from .base import LLAMA_STYLE_NAMES, Family, llama_style_size, rotary_decoder


def _parse(cfg: dict, name: str) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return rotary_decoder(cfg, name, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
                          qk_norm=False, sliding_window=None)


_L3 = {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128001}


def _l31(factor: float) -> dict:
    return {**_L3, "max_position_embeddings": 131072, "rope_scaling": {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}


_L2 = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2}

FAMILY = Family(
    name="llama",
    model_types=("llama",),
    tensor_names=LLAMA_STYLE_NAMES,
    sizes={
        "llama-7b": llama_style_size(4096, 32, 32, 32, 11008, 32000, "llama", rms_norm_eps=1e-6,
                                     max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
        "llama-2-7b": llama_style_size(4096, 32, 32, 32, 11008, 32000, "llama", **_L2),
        "llama-2-13b": llama_style_size(5120, 40, 40, 40, 13824, 32000, "llama", **_L2),
        "llama-2-70b": llama_style_size(8192, 80, 64, 8, 28672, 32000, "llama", **_L2),
        "llama-3-8b": llama_style_size(4096, 32, 32, 8, 14336, 128256, "llama", max_position_embeddings=8192, **_L3),
        "llama-3-70b": llama_style_size(8192, 80, 64, 8, 28672, 128256, "llama", max_position_embeddings=8192,
                                        **_L3),
        "llama-3.1-8b": llama_style_size(4096, 32, 32, 8, 14336, 128256, "llama", **_l31(8.0)),
        "llama-3.1-70b": llama_style_size(8192, 80, 64, 8, 28672, 128256, "llama", **_l31(8.0)),
        "llama-3.1-405b": llama_style_size(16384, 126, 128, 8, 53248, 128256, "llama", **_l31(8.0)),
        "llama-3.2-1b": llama_style_size(2048, 16, 32, 8, 8192, 128256, "llama", head_dim=64,
                                         tie_word_embeddings=True, **_l31(32.0)),
        "llama-3.2-3b": llama_style_size(3072, 28, 24, 8, 8192, 128256, "llama", head_dim=128,
                                         tie_word_embeddings=True, **_l31(32.0)),
    },
    aliases={"llama-3.3-70b": "llama-3.1-70b"},
    hub_ids={"llama-7b": "huggyllama/llama-7b", "llama-2-7b": "meta-llama/Llama-2-7b-hf",
             "llama-2-13b": "meta-llama/Llama-2-13b-hf", "llama-2-70b": "meta-llama/Llama-2-70b-hf",
             "llama-3-8b": "meta-llama/Meta-Llama-3-8B", "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
             "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
             "llama-3.1-405b": "meta-llama/Llama-3.1-405B", "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
             "llama-3.2-3b": "meta-llama/Llama-3.2-3B"},
    text_tokens={"*": ("<|begin_of_text|>", "<|end_of_text|>"), "llama-7b": ("<s>", "</s>"),
                 "llama-2-7b": ("<s>", "</s>"), "llama-2-13b": ("<s>", "</s>"), "llama-2-70b": ("<s>", "</s>")},
    add_bos=True,
    parse=_parse,
)
