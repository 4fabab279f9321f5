"""What a family table holds, and the config.json readers the families share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..config import ConfigError
from ..rope import rope_from_config


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    tensor_names: dict[str, str]  # role -> HF module name ({i}: decoder layer index), `model.` stripped
    sizes: dict[str, dict]  # public name -> config.json keys of that size
    add_bos: bool  # does the tokenizer prepend BOS to a prompt (base-model prompting)
    parse: Callable[[dict, str], dict]  # config.json -> ModelSpec keyword arguments
    aliases: dict[str, str] = field(default_factory=dict)
    hub_ids: dict[str, str] = field(default_factory=dict)  # public name -> hub id of the base model
    # HELM tokenizer settings (prefix_token, end_of_text_token) by public name; "*" for the rest
    text_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)

    def tokens_for(self, size: str) -> tuple[str, str]:
        return self.text_tokens.get(size, self.text_tokens["*"])

    def spec(self, config: dict, name: str):
        from ..model_spec import ModelSpec
        return ModelSpec(name=name, family=self.name, **self.parse(config, name))


def need(cfg: dict, key: str, name: str):
    if cfg.get(key) is None:
        raise ConfigError(f"{name}: config.json lacks {key!r}, which its model_type "
                          f"{cfg.get('model_type')!r} needs; re-save the checkpoint's config")
    return cfg[key]


def token_ids(cfg: dict) -> dict:
    eos = cfg.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else eos
    pad = cfg.get("pad_token_id")
    if pad is None:  # padding is masked everywhere; any id in range does
        pad = (eos[0] if isinstance(eos, tuple) else eos) if eos is not None else 0
    return {"pad_token_id": pad, "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_id": eos if eos is not None else ()}


def window_layers(cfg: dict, num_layers: int) -> tuple[int, ...] | None:
    """Layers with sliding-window attention: `layer_types` when present, else Qwen2-style
    `max_window_layers` (layers from that index on), else all."""
    types = cfg.get("layer_types")
    if types:
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if cfg.get("max_window_layers") is not None and cfg.get("model_type") in ("qwen2", "qwen3"):
        return tuple(range(int(cfg["max_window_layers"]), num_layers))
    return None


def rotary_decoder(cfg: dict, name: str, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool, qk_norm: bool,
                   sliding_window: int | None, head_dim_default: int | None = None,
                   tie_default: bool = False) -> dict:
    """ModelSpec arguments of a Llama-style block: RMSNorm, gated SiLU MLP, rotary positions."""
    hidden = int(need(cfg, "hidden_size", name))
    heads = int(need(cfg, "num_attention_heads", name))
    layers = int(need(cfg, "num_hidden_layers", name))
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{name}: hidden_act {act!r} is not supported for {cfg.get('model_type')} (silu only)")
    head_dim = cfg.get("head_dim") or head_dim_default or hidden // heads
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{name}: partial_rotary_factor != 1 is not supported")
    wl = window_layers(cfg, layers) if sliding_window else None
    return dict(
        num_layers=layers, hidden=hidden, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        ffn=int(need(cfg, "intermediate_size", name)), vocab_size=int(need(cfg, "vocab_size", name)),
        max_positions=int(cfg.get("max_position_embeddings") or 2048),
        norm="rms", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), mlp="silu_gated",
        positions="rotary", position_offset=0, rope=rope_from_config(cfg, name),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, qk_norm=qk_norm,
        sliding_window=int(sliding_window) if sliding_window else None,
        window_layers=wl if wl is None or len(wl) < layers else None,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)), **token_ids(cfg))


# HF module names of the Llama-style block, shared by Llama, Mistral and both Qwens
LLAMA_STYLE_NAMES = {
    "tok_embed": "embed_tokens",
    "attn_norm": "layers.{i}.input_layernorm",
    "q": "layers.{i}.self_attn.q_proj", "k": "layers.{i}.self_attn.k_proj",
    "v": "layers.{i}.self_attn.v_proj", "o": "layers.{i}.self_attn.o_proj",
    "q_norm": "layers.{i}.self_attn.q_norm", "k_norm": "layers.{i}.self_attn.k_norm",
    "mlp_norm": "layers.{i}.post_attention_layernorm",
    "gate": "layers.{i}.mlp.gate_proj", "up": "layers.{i}.mlp.up_proj", "down": "layers.{i}.mlp.down_proj",
    "final_norm": "norm",
    "lm_head": "lm_head",
}


def llama_style_size(hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, model_type: str,
                     **extra) -> dict:
    return {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ffn,
            "vocab_size": vocab, **extra}
