"""OPT math as plain functions of (weights, activations, attention callback). Shapes:
b rows, t new tokens, h hidden, H heads, d = h/H head dim, n keys attended.

`w` maps the layer's HF tensor names (prefix stripped, e.g. "fc1.weight") to tensors on the
compute device, already dequantized.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .model_spec import ModelSpec

Weights = dict[str, torch.Tensor]
# attend(q, k, v) with q/k/v: (b, H, t, d) for the new tokens -> attention output (b, H, t, d)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """OPT's learned positions with left padding: real tokens count 0, 1, 2...; pads get -1."""
    return torch.cumsum(mask, dim=1) * mask - 1


def embed(w: Weights, spec: ModelSpec, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ids, positions: (b, t) -> (b, t, h). OPT offsets its position table by 2."""
    x = F.embedding(ids, w["embed_tokens.weight"])
    if spec.has_projections:
        x = x @ w["project_in.weight"].t()
    return x + F.embedding(positions + 2, w["embed_positions.weight"])


def _ln(w: Weights, name: str, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if spec.layer_norm_elementwise_affine:
        return F.layer_norm(x, (spec.hidden,), w[name + ".weight"], w[name + ".bias"], 1e-5)
    return F.layer_norm(x, (spec.hidden,), eps=1e-5)


def _linear(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def decoder_layer(w: Weights, spec: ModelSpec, x: torch.Tensor, attend: Attend) -> torch.Tensor:
    """One OPT decoder layer, pre-LN (all sizes) or post-LN (opt-350m). x: (b, t, h)."""
    b, t, h = x.shape
    H, d = spec.num_heads, spec.head_dim
    pre = spec.do_layer_norm_before
    res = x
    if pre:
        x = _ln(w, "self_attn_layer_norm", x, spec)
    q, k, v = (_linear(w, f"self_attn.{p}_proj", x).view(b, t, H, d).transpose(1, 2) for p in "qkv")
    o = attend(q, k, v).transpose(1, 2).reshape(b, t, h)
    # in-place adds and ReLU: fewer fresh multi-MB tensors, and on the CPU each one costs page faults
    x = _linear(w, "self_attn.out_proj", o).add_(res)
    if not pre:
        x = _ln(w, "self_attn_layer_norm", x, spec)
    res = x
    if pre:
        x = _ln(w, "final_layer_norm", x, spec)
    x = _linear(w, "fc2", torch.relu_(_linear(w, "fc1", x))).add_(res)
    if not pre:
        x = _ln(w, "final_layer_norm", x, spec)
    return x


def lm_head(w: Weights, spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    """(b, t, h) -> fp32 logits (b, t, vocab)."""
    if spec.has_final_layer_norm:
        x = F.layer_norm(x, (spec.hidden,), w["final_layer_norm.weight"], w["final_layer_norm.bias"], 1e-5)
    if spec.has_projections:
        x = x @ w["project_out.weight"].t()
    return (x @ w["lm_head.weight"].t()).float()


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Causal self-attention over a left-padded prompt. key_mask: (b, s) bool, True = real token.
    A pad query may see itself so no softmax row is empty (its output is never used)."""
    s = q.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    allowed = (causal & key_mask[:, None, None, :]) | torch.eye(s, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def decode_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                     key_mask: torch.Tensor) -> torch.Tensor:
    """q: (b, H, 1, d) against n cached keys (b, H, n, d); key_mask (b, n) bool."""
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=key_mask[:, None, None, :])
