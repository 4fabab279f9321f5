"""`ModelSpec`: everything that differs between the decoder families the engine runs, read from a
checkpoint's `config.json` (or a public size for `dummy:` weights), and the one place where tensor
shapes, bytes and FLOPs are counted. Placement, the memory plan, the policy search, the profiler,
bench and prod-env all count through it.

A family's knowledge lives in `engine/families/<family>.py`: its HF tensor names, public sizes,
tokenizer defaults and config quirks. The math is one decoder block (`layers.py`) parameterized
by this spec.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

from .config import ConfigError
from .rope import RopeSpec


@dataclass(frozen=True)
class TensorRef:
    """One weight of a scheduling layer: its role inside the layer (what layers.py reads), its
    name in the checkpoint (without a `model.` prefix) and its shape."""

    role: str
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a key of engine/families.FAMILIES
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int  # GQA/MQA: the KV cache is num_kv_heads * head_dim wide
    head_dim: int  # may differ from hidden / num_heads (Qwen3)
    ffn: int
    vocab_size: int
    max_positions: int = 2048
    norm: str = "layer"  # "layer" (LayerNorm) or "rms" (RMSNorm)
    norm_eps: float = 1e-5
    norm_affine: bool = True  # LayerNorm weight (+ bias) present
    post_norm: bool = False  # OPT-350m: norms after the residual add
    mlp: str = "relu"  # "relu" / "gelu" (fc1 -> fc2) or "silu_gated" (down(silu(gate) * up))
    positions: str = "learned"  # "learned" (OPT's table) or "rotary"
    position_offset: int = 2  # OPT's learned table starts at row 2
    rope: RopeSpec | None = None
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # a query sees the last `sliding_window` positions
    window_layers: tuple[int, ...] | None = None  # layers with the window (None: all, when set)
    tie_embeddings: bool = True
    embed_proj_dim: int | None = None  # OPT-350m: token embeddings of 512, projected to/from `hidden`
    pad_token_id: int = 1
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] = 2

    def __post_init__(self) -> None:
        from .families import FAMILIES
        if self.family not in FAMILIES:
            raise ConfigError(f"{self.name}: unknown family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for key in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "ffn", "vocab_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{self.name}: {key} must be a positive integer, got {getattr(self, key)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self.name}: {self.num_heads} attention heads are not a multiple of "
                              f"{self.num_kv_heads} key/value heads")
        if self.positions == "rotary" and (self.rope is None or self.head_dim % 2):
            raise ConfigError(f"{self.name}: rotary positions need rope settings and an even head_dim")
        if self.norm not in ("layer", "rms") or self.mlp not in ("relu", "gelu", "silu_gated"):
            raise ConfigError(f"{self.name}: unsupported norm {self.norm!r} or MLP {self.mlp!r}")

    # ---- derived shapes ---------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Width of the token embedding and LM head (hidden unless OPT-350m's projections)."""
        return self.embed_proj_dim or self.hidden

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.hidden

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def has_final_norm(self) -> bool:
        return not self.post_norm

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of decoder layer `layer` (0-based), or None for full attention."""
        if self.sliding_window is None:
            return None
        return self.sliding_window if self.window_layers is None or layer in self.window_layers else None

    # ---- tensors of each scheduling layer: 0 = embeddings, 1..L = decoders, L+1 = head --------
    def layer_tensors(self, j: int) -> list[TensorRef]:
        from .families import FAMILIES
        names = FAMILIES[self.family].tensor_names
        h, e, f = self.hidden, self.embed_dim, self.ffn
        out: list[tuple[str, tuple[int, ...]]] = []
        L = self.num_layers
        if j == 0:
            out.append(("tok_embed.weight", (self.vocab_size, e)))
            if self.positions == "learned":
                out.append(("pos_embed.weight", (self.max_positions + self.position_offset, h)))
            if self.has_projections:
                out.append(("project_in.weight", (h, e)))
        elif j == L + 1:
            if self.has_final_norm:
                out += self._norm("final_norm", h)
            if self.has_projections:
                out.append(("project_out.weight", (e, h)))
            out.append(("lm_head.weight", (self.vocab_size, e)))
        elif 1 <= j <= L:
            out += self._norm("attn_norm", h)
            # q, k, v (and gate, up) weights back to back, then their biases: the weight store can
            # then view each group as one fused matrix (one matmul instead of three)
            qkv = (("q", self.q_width), ("k", self.kv_width), ("v", self.kv_width))
            out += [(f"{role}.weight", (rows, h)) for role, rows in qkv]
            if self.qkv_bias:
                out += [(f"{role}.bias", (rows,)) for role, rows in qkv]
            if self.qk_norm:
                out += [("q_norm.weight", (self.head_dim,)), ("k_norm.weight", (self.head_dim,))]
            out.append(("o.weight", (h, self.q_width)))
            if self.o_bias:
                out.append(("o.bias", (h,)))
            out += self._norm("mlp_norm", h)
            ins = ("gate", "up") if self.mlp == "silu_gated" else ("fc1",)
            out += [(f"{role}.weight", (f, h)) for role in ins]
            if self.mlp_bias:
                out += [(f"{role}.bias", (f,)) for role in ins]
            down = "down" if self.mlp == "silu_gated" else "fc2"
            out.append((f"{down}.weight", (h, f)))
            if self.mlp_bias:
                out.append((f"{down}.bias", (h,)))
        else:
            raise IndexError(f"scheduling layer {j} out of range 0..{L + 1}")
        refs = []
        for role, shape in out:
            module, _, kind = role.rpartition(".")
            refs.append(TensorRef(role, names[module].format(i=j - 1) + "." + kind, shape))
        return refs

    def _norm(self, role: str, width: int) -> list[tuple[str, tuple[int, ...]]]:
        if self.norm == "rms":
            return [(f"{role}.weight", (width,))]
        return [(f"{role}.weight", (width,)), (f"{role}.bias", (width,))] if self.norm_affine else []

    # ---- element, byte and FLOP counts -------------------------------------------------------
    def layer_params(self, j: int = 1) -> int:
        """Elements stored in scheduling layer j (the LM head counts even when tied: it is stored again)."""
        return sum(math.prod(t.shape) for t in self.layer_tensors(j))

    def num_params(self) -> int:
        """Distinct parameters, as the model card counts them (a tied head counts once)."""
        n = self.layer_params(0) + self.num_layers * self.layer_params(1) + self.layer_params(self.num_layers + 1)
        return n - (self.vocab_size * self.embed_dim if self.tie_embeddings else 0)

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.num_params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one position in one layer: 2 x kv_heads x head_dim elements."""
        return 2 * self.kv_width * dtype_bytes

    def layer_matmul_flops(self, tokens: float) -> float:
        """Projection and MLP FLOPs of one decoder layer for `tokens` new tokens (attention excluded)."""
        per_token = self.q_width * self.hidden * 2 + 2 * self.kv_width * self.hidden \
            + (3 if self.mlp == "silu_gated" else 2) * self.hidden * self.ffn
        return 2.0 * tokens * per_token

    def attention_flops(self, tokens: float, context: float) -> float:
        """QK^T and PV FLOPs of one layer: `tokens` queries against `context` keys each."""
        return 4.0 * tokens * context * self.q_width

    def head_flops(self, rows: float) -> float:
        """LM head (+ OPT-350m's output projection) FLOPs for `rows` positions."""
        return 2.0 * rows * (self.vocab_size * self.embed_dim + (self.embed_dim * self.hidden if self.has_projections else 0))

    def embed_flops(self, tokens: float) -> float:
        return 2.0 * tokens * self.embed_dim * self.hidden if self.has_projections else 0.0

    def step_matmul_flops(self, tokens: float) -> float:
        """Matmul FLOPs of one whole step over `tokens` (every layer, head on each position)."""
        return self.num_layers * self.layer_matmul_flops(tokens) + self.head_flops(tokens) + self.embed_flops(tokens)

    def probe(self, num_layers: int = 1, max_positions: int | None = None) -> "ModelSpec":
        """The same layer shape with fewer layers (profiling)."""
        return replace(self, name=f"{self.name}-probe", num_layers=num_layers,
                       max_positions=max_positions or self.max_positions, window_layers=None)


# ---- reading specs ---------------------------------------------------------------------------
def spec_from_config(config: dict, name: str = "model") -> ModelSpec:
    from .families import family_for_config
    return family_for_config(config, name).spec(config, name)


def spec_from_name(name: str) -> ModelSpec:
    """A public size (`opt-30b`, `llama-3.1-8b`, `facebook/opt-iml-30b`, `Qwen/Qwen2.5-7B`, ...)."""
    from .families import public_config
    cfg = public_config(name)
    return spec_from_config(cfg, name.split("/")[-1].lower())


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{directory} is a directory without config.json; point at a HF checkpoint directory")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}; re-download or re-save the checkpoint") from e


def load_spec(model: str) -> ModelSpec:
    """A checkpoint directory, `dummy:NAME`, or a public name/hub id."""
    if model.startswith("dummy:"):
        return spec_from_name(model[len("dummy:"):])
    if os.path.isdir(model):
        return spec_from_config(read_config(model), name=os.path.basename(os.path.normpath(model)))
    return spec_from_name(model)
