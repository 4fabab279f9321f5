"""One decoder block for every family, as plain functions of (weights, activations, attention
callback), parameterized by `ModelSpec`. Shapes: b rows, t new tokens, h hidden, H query heads,
G key/value heads (G divides H), d head dim, n keys attended.

`w` maps a layer's tensor roles ("q.weight", "gate.weight", "attn_norm.weight", ...; see
ModelSpec.layer_tensors) to tensors on the compute device, already dequantized.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .model_spec import ModelSpec
from .rope import apply_rotary

Weights = dict[str, torch.Tensor]
# attend(q, k, v): q (b, H, t, d), k/v (b, G, t, d) for the new tokens, RoPE applied -> (b, H, t, d)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CosSin = tuple[torch.Tensor, torch.Tensor]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions with left padding: real tokens count 0, 1, 2...; pads get -1."""
    return torch.cumsum(mask, dim=1) * mask - 1


def norm(w: Weights, role: str, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if spec.norm == "rms":  # in fp32 like the reference, then the weight in the compute dtype
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=spec.norm_eps).to(x.dtype)
        return y * w[role + ".weight"]
    if spec.norm_affine:
        return F.layer_norm(x, (x.shape[-1],), w[role + ".weight"], w[role + ".bias"], spec.norm_eps)
    return F.layer_norm(x, (x.shape[-1],), eps=spec.norm_eps)


def _linear(w: Weights, role: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[role + ".weight"], w.get(role + ".bias"))


def embed(w: Weights, spec: ModelSpec, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ids, positions: (b, t) -> (b, t, h). Learned positions are looked up here; rotary ones are
    applied inside attention."""
    x = F.embedding(ids, w["tok_embed.weight"])
    if spec.has_projections:
        x = x @ w["project_in.weight"].t()
    if spec.positions == "learned":
        x = x + F.embedding(positions + spec.position_offset, w["pos_embed.weight"])
    return x


def _mlp(w: Weights, spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.mlp == "silu_gated":
        return _linear(w, "down", F.silu(_linear(w, "gate", x)).mul_(_linear(w, "up", x)))
    # in-place activation: one fresh multi-MB tensor fewer per call (page faults on the CPU)
    hid = _linear(w, "fc1", x)
    return _linear(w, "fc2", torch.relu_(hid) if spec.mlp == "relu" else F.gelu(hid))


def decoder_layer(w: Weights, spec: ModelSpec, x: torch.Tensor, attend: Attend,
                  rotary: CosSin | None = None) -> torch.Tensor:
    """One decoder layer, pre-norm or post-norm (OPT-350m). x: (b, t, h); rotary: cos/sin of the
    new tokens' positions, (b, 1, t, d)."""
    b, t, h = x.shape
    H, G, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    post = spec.post_norm
    res = x
    if not post:
        x = norm(w, "attn_norm", x, spec)
    q = _linear(w, "q", x).view(b, t, H, d)
    k = _linear(w, "k", x).view(b, t, G, d)
    v = _linear(w, "v", x).view(b, t, G, d).transpose(1, 2)
    if spec.qk_norm:
        q, k = norm(w, "q_norm", q, spec), norm(w, "k_norm", k, spec)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if rotary is not None:  # before K enters the cache: cached keys are final
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    o = attend(q, k, v).transpose(1, 2).reshape(b, t, H * d)
    # in-place residual adds: fewer fresh multi-MB tensors, and on the CPU each one costs page faults
    x = _linear(w, "o", o).add_(res)
    if post:
        x = norm(w, "attn_norm", x, spec)
    res = x
    if not post:
        x = norm(w, "mlp_norm", x, spec)
    x = _mlp(w, spec, x).add_(res)
    if post:
        x = norm(w, "mlp_norm", x, spec)
    return x


def lm_head(w: Weights, spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    """(b, t, h) -> fp32 logits (b, t, vocab)."""
    if spec.has_final_norm:
        x = norm(w, "final_norm", x, spec)
    if spec.has_projections:
        x = x @ w["project_out.weight"].t()
    return (x @ w["lm_head.weight"].t()).float()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    # enable_gqa: the kernels index a shared K/V head per group of query heads, with no copy
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                      window: int | None = None) -> torch.Tensor:
    """Causal self-attention over a left-padded prompt. key_mask: (b, s) bool, True = real token;
    window: a query sees only the last `window` positions (itself included).
    A pad query may see itself so no softmax row is empty (its output is never used)."""
    s = q.shape[2]
    idx = torch.arange(s, device=q.device)
    rel = idx[:, None] - idx[None, :]  # query index - key index
    causal = rel >= 0 if window is None else (rel >= 0) & (rel < window)
    allowed = (causal & key_mask[:, None, None, :]) | torch.eye(s, dtype=torch.bool, device=q.device)
    return _sdpa(q, k, v, allowed)


def decode_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                     key_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """q: (b, H, 1, d) against n cached keys (b, G, n, d); key_mask (b, n) bool."""
    if window is not None and key_mask.shape[1] > window:
        key_mask = key_mask.clone()
        key_mask[:, :key_mask.shape[1] - window] = False
    return _sdpa(q, k_all, v_all, key_mask[:, None, None, :])
