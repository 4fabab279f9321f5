"""Qwen2 / Qwen2.5: the Llama-style block with q/k/v biases (no o bias); small sizes tie their
embeddings; sliding window only with `use_sliding_window`, from layer `max_window_layers` on."""
from __future__ import annotations

from .base import LLAMA_STYLE_NAMES, Family, llama_style_size, rotary_decoder


def _window(cfg: dict) -> int | None:
    return cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None


def _parse(cfg: dict, name: str) -> dict:
    return rotary_decoder(cfg, name, qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False,
                          sliding_window=_window(cfg))


def size(hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, tie: bool, model_type: str = "qwen2",
         **extra) -> dict:
    base = {"tie_word_embeddings": tie, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768, "bos_token_id": 151643, "eos_token_id": 151643}
    return llama_style_size(hidden, layers, heads, kv, ffn, vocab, model_type, **{**base, **extra})


_SIZES = {
    "qwen2.5-0.5b": size(896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": size(1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-3b": size(2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-7b": size(3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-14b": size(5120, 48, 40, 8, 13824, 152064, False),
    "qwen2.5-32b": size(5120, 64, 40, 8, 27648, 152064, False),
    "qwen2.5-72b": size(8192, 80, 64, 8, 29568, 152064, False),
}


FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    tensor_names=LLAMA_STYLE_NAMES,
    sizes=_SIZES,
    aliases={"qwen2-0.5b": "qwen2.5-0.5b", "qwen2-1.5b": "qwen2.5-1.5b", "qwen2-7b": "qwen2.5-7b",
             "qwen2-72b": "qwen2.5-72b"},
    hub_ids={n: "Qwen/Qwen" + n[len("qwen"):].upper() for n in _SIZES},  # qwen2.5-7b -> Qwen/Qwen2.5-7B
    text_tokens={"*": ("", "<|endoftext|>")},
    add_bos=False,  # Qwen tokenizers add no BOS
    parse=_parse,
)
