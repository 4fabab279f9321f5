"""Mistral: the Llama-style block with GQA and, when the config sets one, a sliding window."""
from __future__ import annotations

from .base import LLAMA_STYLE_NAMES, Family, llama_style_size, rotary_decoder


def _parse(cfg: dict, name: str) -> dict:
    return rotary_decoder(cfg, name, qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False,
                          sliding_window=cfg.get("sliding_window"))


FAMILY = Family(
    name="mistral",
    model_types=("mistral",),
    tensor_names=LLAMA_STYLE_NAMES,
    sizes={
        "mistral-7b-v0.1": llama_style_size(4096, 32, 32, 8, 14336, 32000, "mistral", sliding_window=4096,
                                            rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
                                            bos_token_id=1, eos_token_id=2),
        "mistral-7b-v0.3": llama_style_size(4096, 32, 32, 8, 14336, 32768, "mistral", sliding_window=None,
                                            rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
                                            bos_token_id=1, eos_token_id=2),
    },
    aliases={"mistral-7b": "mistral-7b-v0.1"},
    hub_ids={"mistral-7b-v0.1": "mistralai/Mistral-7B-v0.1", "mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3"},
    text_tokens={"*": ("<s>", "</s>")},
    add_bos=True,
    parse=_parse,
)
