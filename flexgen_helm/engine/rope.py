"""Rotary position embeddings: the per-family settings read from `config.json`, the inverse
frequencies of every scaling type transformers applies to Llama/Mistral/Qwen (default, linear,
llama3, yarn), and the rotation itself (the "rotate half" convention of those checkpoints)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int | None = None  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: scales cos/sin; None = derived from factor
    mscale: float | None = None  # yarn (DeepSeek-style configs)
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn: round the correction range to whole dimensions


def rope_from_config(cfg: dict, name: str) -> RopeSpec:
    """Legacy keys (`rope_theta` + `rope_scaling`) or the newer `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    if isinstance(params.get("full_attention"), dict):  # per-layer-type form: one kind of layer here
        params = dict(params["full_attention"])
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{name}: rope scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    orig = merged.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    if kind in ("llama3", "yarn") and orig is None:
        orig = cfg.get("max_position_embeddings")
        if orig is None:
            raise ConfigError(f"{name}: {kind} rope scaling needs original_max_position_embeddings in config.json")
    factor = merged.get("factor")
    if factor is None:  # yarn without a factor: stretch the original context to the configured one
        factor = cfg["max_position_embeddings"] / orig if kind == "yarn" and cfg.get("max_position_embeddings") \
            else 1.0
    return RopeSpec(
        theta=float(theta), type=kind, factor=float(factor),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_positions=int(orig) if orig is not None else None,
        beta_fast=float(merged.get("beta_fast") or 32.0), beta_slow=float(merged.get("beta_slow") or 1.0),
        attention_factor=merged.get("attention_factor"), mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"), truncate=bool(merged.get("truncate", True)))


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def inv_freq_and_scale(rope: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (dim/2,) in fp32, factor applied to cos and sin)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = rope.theta ** exponent
    inv = 1.0 / base
    if rope.type == "default":
        return inv, 1.0
    if rope.type == "linear":
        return inv / rope.factor, 1.0
    if rope.type == "llama3":
        # wavelengths longer than the original context are interpolated by `factor`, shorter than
        # context/high_freq_factor kept, and the band between blended smoothly
        ctx = rope.original_max_positions
        wavelen = 2 * math.pi / inv
        long_wl, short_wl = ctx / rope.low_freq_factor, ctx / rope.high_freq_factor
        scaled = torch.where(wavelen > long_wl, inv / rope.factor, inv)
        smooth = (ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= short_wl) & (wavelen <= long_wl)
        return torch.where(medium, blended, scaled), 1.0
    # yarn: per-dimension mix of interpolated and extrapolated frequencies, plus an attention scale
    if rope.attention_factor is not None:
        scale = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        scale = _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        scale = _yarn_mscale(rope.factor)
    ctx = rope.original_max_positions

    def correction_dim(rotations: float) -> float:
        return dim * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))
    lo, hi = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return (inv / rope.factor) * (1 - keep) + inv * keep, scale


class Rotary:
    """cos/sin tables for one model, built once per device (fp32, like the reference)."""

    def __init__(self, rope: RopeSpec, dim: int):
        self.inv_freq, self.scale = inv_freq_and_scale(rope, dim)
        self._on: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (b, t) -> cos, sin (b, 1, t, d) in `dtype`, ready to broadcast over heads."""
        inv = self._on.get(positions.device)
        if inv is None:
            inv = self._on[positions.device] = self.inv_freq.to(positions.device)
        ang = positions.clamp(min=0).float()[..., None] * inv  # pads (position -1) never matter
        ang = torch.cat((ang, ang), dim=-1)[:, None]
        return (ang.cos() * self.scale).to(dtype), (ang.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, t, d): x*cos + rotate_half(x)*sin, where rotate_half(x) = (-x2, x1)."""
    from . import kernels
    out = kernels.rope(x, cos, sin)  # speed: a decode step's rows in one pass, not six torch ops
    if out is not None:
        return out
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin
