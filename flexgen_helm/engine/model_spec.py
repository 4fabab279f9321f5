"""OPT shapes, from a HF `config.json` or a public model name, and the byte/FLOP counts
that placement, the policy search and the benchmarks share."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace

from .config import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    ffn: int
    vocab_size: int
    max_positions: int = 2048
    word_embed_proj_dim: int | None = None  # opt-350m: 512, projected to/from `hidden`
    do_layer_norm_before: bool = True  # False only for opt-350m (post-LN)
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.hidden % self.num_heads:
            raise ConfigError(f"hidden size {self.hidden} is not divisible by {self.num_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.hidden

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before

    # ---- element counts -------------------------------------------------
    def layer_params(self) -> int:
        h, f = self.hidden, self.ffn
        b = 1 if self.enable_bias else 0
        attn = 4 * h * h + 4 * h * b
        mlp = 2 * h * f + (f + h) * b
        norms = 4 * h if self.layer_norm_elementwise_affine else 0
        return attn + mlp + norms

    def embed_params(self) -> int:
        """Token + position embeddings (+ project_in)."""
        n = self.vocab_size * self.embed_dim + (self.max_positions + 2) * self.hidden
        return n + (self.embed_dim * self.hidden if self.has_projections else 0)

    def head_params(self) -> int:
        """Final norm (+ project_out) + the LM head (tied to the token embedding, stored again)."""
        n = self.vocab_size * self.embed_dim
        n += 2 * self.hidden if self.has_final_layer_norm else 0
        return n + (self.embed_dim * self.hidden if self.has_projections else 0)

    def num_params(self) -> int:
        """Distinct parameters (the LM head is tied to the token embedding)."""
        return self.embed_params() + self.num_layers * self.layer_params() + self.head_params() \
            - self.vocab_size * self.embed_dim

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.num_params() * dtype_bytes

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 2) -> int:
        """K and V for every layer."""
        return 2 * batch * seq_len * self.num_layers * self.hidden * dtype_bytes

    def hidden_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 2) -> int:
        return batch * seq_len * self.hidden * dtype_bytes

    def layer_flops(self, batch: int, new_tokens: int, context: int) -> float:
        """Matmul FLOPs of one decoder layer for `new_tokens` per row attending to `context` keys."""
        t = batch * new_tokens
        proj = 2 * t * (4 * self.hidden * self.hidden + 2 * self.hidden * self.ffn)
        attn = 2 * 2 * t * context * self.hidden
        return float(proj + attn)

    def with_max_positions(self, n: int) -> "ModelSpec":
        return replace(self, max_positions=n)


# (layers, hidden, heads, ffn); vocab 50272 and 2048 positions for all public sizes.
_PUBLIC = {
    "opt-125m": (12, 768, 12, 3072),
    "opt-350m": (24, 1024, 16, 4096),
    "opt-1.3b": (24, 2048, 32, 8192),
    "opt-2.7b": (32, 2560, 32, 10240),
    "opt-6.7b": (32, 4096, 32, 16384),
    "opt-13b": (40, 5120, 40, 20480),
    "opt-30b": (48, 7168, 56, 28672),
    "opt-66b": (64, 9216, 72, 36864),
    "opt-175b": (96, 12288, 96, 49152),
}


def spec_from_name(name: str) -> ModelSpec:
    """`opt-30b`, `facebook/opt-iml-30b`, `opt-iml-max-1.3b`, ... -> ModelSpec."""
    base = name.split("/")[-1].lower()
    key = re.sub(r"-iml(-max)?", "", base)
    if key not in _PUBLIC:
        raise ConfigError(
            f"unknown OPT model {name!r}: use one of {', '.join(_PUBLIC)} (optionally -iml / -iml-max), "
            "or a directory with a HF config.json")
    layers, hidden, heads, ffn = _PUBLIC[key]
    if key == "opt-350m":
        return ModelSpec(base, layers, hidden, heads, ffn, 50272, word_embed_proj_dim=512,
                         do_layer_norm_before=False)
    return ModelSpec(base, layers, hidden, heads, ffn, 50272)


def spec_from_config(config: dict, name: str = "opt") -> ModelSpec:
    if config.get("model_type", "opt") != "opt":
        raise ConfigError(f"{name}: model_type {config.get('model_type')!r} is not OPT; only OPT models run here")
    hidden = config["hidden_size"]
    return ModelSpec(
        name=name,
        num_layers=config["num_hidden_layers"],
        hidden=hidden,
        num_heads=config["num_attention_heads"],
        ffn=config["ffn_dim"],
        vocab_size=config["vocab_size"],
        max_positions=config.get("max_position_embeddings", 2048),
        word_embed_proj_dim=config.get("word_embed_proj_dim") or hidden,
        do_layer_norm_before=config.get("do_layer_norm_before", True),
        enable_bias=config.get("enable_bias", True),
        layer_norm_elementwise_affine=config.get("layer_norm_elementwise_affine", True),
        pad_token_id=config.get("pad_token_id", 1) if config.get("pad_token_id") is not None else 1,
        bos_token_id=config.get("bos_token_id", 2),
        eos_token_id=config.get("eos_token_id", 2),
    )


def load_spec(model: str) -> ModelSpec:
    """A checkpoint directory, `dummy:opt-XXX`, or a public name/hub id."""
    if model.startswith("dummy:"):
        return spec_from_name(model[len("dummy:"):])
    cfg = os.path.join(model, "config.json")
    if os.path.isdir(model):
        if not os.path.exists(cfg):
            raise ConfigError(f"{model} is a directory without config.json; point at a HF OPT checkpoint directory")
        with open(cfg) as f:
            return spec_from_config(json.load(f), name=os.path.basename(os.path.normpath(model)))
    return spec_from_name(model)
