"""OPT (and OPT-IML): learned positions offset by 2, LayerNorm, ReLU fc1/fc2, biases everywhere;
opt-350m is post-LN with 512-wide embeddings projected to and from `hidden`."""
from __future__ import annotations

from ..config import ConfigError
from .base import Family, need, token_ids


def _parse(cfg: dict, name: str) -> dict:
    hidden = int(need(cfg, "hidden_size", name))
    heads = int(need(cfg, "num_attention_heads", name))
    if hidden % heads:
        raise ConfigError(f"{name}: hidden size {hidden} is not divisible by {heads} heads")
    act = cfg.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise ConfigError(f"{name}: OPT activation_function {act!r} is not supported (relu, gelu)")
    bias = bool(cfg.get("enable_bias", True))
    embed = cfg.get("word_embed_proj_dim") or hidden
    ids = token_ids({"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
                     **{k: v for k, v in cfg.items() if k.endswith("_token_id") and v is not None}})
    return dict(
        num_layers=int(need(cfg, "num_hidden_layers", name)), hidden=hidden, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, ffn=int(need(cfg, "ffn_dim", name)),
        vocab_size=int(need(cfg, "vocab_size", name)), max_positions=int(cfg.get("max_position_embeddings", 2048)),
        norm="layer", norm_eps=1e-5, norm_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
        post_norm=not cfg.get("do_layer_norm_before", True), mlp=act, positions="learned", position_offset=2,
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        embed_proj_dim=int(embed) if embed != hidden else None, **ids)


def _size(layers: int, hidden: int, heads: int, ffn: int, **extra) -> dict:
    return {"model_type": "opt", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "ffn_dim": ffn, "vocab_size": 50272, "max_position_embeddings": 2048, **extra}


FAMILY = Family(
    name="opt",
    model_types=("opt",),
    tensor_names={
        "tok_embed": "decoder.embed_tokens", "pos_embed": "decoder.embed_positions",
        "project_in": "decoder.project_in", "project_out": "decoder.project_out",
        "attn_norm": "decoder.layers.{i}.self_attn_layer_norm",
        "q": "decoder.layers.{i}.self_attn.q_proj", "k": "decoder.layers.{i}.self_attn.k_proj",
        "v": "decoder.layers.{i}.self_attn.v_proj", "o": "decoder.layers.{i}.self_attn.out_proj",
        "mlp_norm": "decoder.layers.{i}.final_layer_norm",
        "fc1": "decoder.layers.{i}.fc1", "fc2": "decoder.layers.{i}.fc2",
        "final_norm": "decoder.final_layer_norm", "lm_head": "lm_head",
    },
    sizes={
        "opt-125m": _size(12, 768, 12, 3072),
        "opt-350m": _size(24, 1024, 16, 4096, word_embed_proj_dim=512, do_layer_norm_before=False),
        "opt-1.3b": _size(24, 2048, 32, 8192),
        "opt-2.7b": _size(32, 2560, 32, 10240),
        "opt-6.7b": _size(32, 4096, 32, 16384),
        "opt-13b": _size(40, 5120, 40, 20480),
        "opt-30b": _size(48, 7168, 56, 28672),
        "opt-66b": _size(64, 9216, 72, 36864),
        "opt-175b": _size(96, 12288, 96, 49152),
    },
    text_tokens={"*": ("</s>", "</s>")},
    add_bos=True,  # OPT's tokenizer prepends </s> (id 2)
    parse=_parse,
)
