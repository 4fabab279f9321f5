"""Choosing the next token and reporting its log-probability.

Reported logprobs are the model's own (log_softmax of the raw logits), whatever the sampling
temperature: that is what HELM's calibration and perplexity metrics expect.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_top_logprobs: int = 0


def row_generators(seed: int, row_ids: list[int]) -> list[torch.Generator]:
    """One generator per output row, keyed by (seed, row id): a row's samples do not depend on
    which other rows share its batch."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + r) & 0x7FFFFFFFFFFFFFFF) for r in row_ids]


def next_tokens(logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator] | None):
    """logits: fp32 (b, vocab). Returns (tokens (b,), logprobs (b,), top (values, ids) or None)."""
    logp = torch.log_softmax(logits, dim=-1)
    if params.temperature <= 0.0:
        tokens = torch.argmax(logits, dim=-1)
    else:
        z = logits / params.temperature
        if params.top_k > 0 and params.top_k < z.shape[-1]:
            kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_z, idx = torch.sort(z, dim=-1, descending=True)
            probs = torch.softmax(sorted_z, dim=-1)
            # drop a token when the mass before it already reaches top_p (the first always stays)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
            sorted_z = sorted_z.masked_fill(drop, float("-inf"))
            z = torch.full_like(z, float("-inf")).scatter(-1, idx, sorted_z)
        probs = torch.softmax(z, dim=-1).cpu()
        tokens = torch.stack([torch.multinomial(probs[i], 1, generator=gens[i])[0]
                              for i in range(probs.shape[0])]).to(logits.device)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    top = None
    if params.num_top_logprobs > 0:
        top = torch.topk(logp, params.num_top_logprobs, dim=-1)
    return tokens, chosen, top
