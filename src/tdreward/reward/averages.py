"""Causal exponential moving averages along the token axis, vectorised (pure torch).

The slow context V sees and the reward centre m_t (docs/design.md §2.3) are bias-corrected
exponential moving averages: m_t = sum_{s<=t} (1-a) a^(t-s) x_s / sum_{s<=t} (1-a) a^(t-s),
a = 1 - 1/timescale, so the first positions hold the running mean instead of a decay from
zero. Padding neither decays nor updates them: the decay counts valid tokens only.

A Python loop over tokens costs a few microseconds per token and per call, which on whole
documents of thousands of tokens dominated scoring; here each chunk of `chunk` tokens is one
batched matrix product with the decay kernel, plus the carry from the previous chunk.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def causal_ema(x: Tensor, mask: Tensor, timescale: float, chunk: int = 256) -> Tensor:
    """Bias-corrected causal EMA of x [B, T, F] along T; mask [B, T]. Returns [B, T, F].

    Positions before a row's first valid token hold 0; padding holds the last value."""
    B, T, F = x.shape
    m = mask.to(x.dtype)
    if timescale <= 1.0:  # a = 0: the latest valid value, held across padding
        pos = torch.arange(T, device=x.device).expand(B, T)
        last = torch.cummax(torch.where(m.bool(), pos, torch.full_like(pos, -1)), 1).values
        held = x.gather(1, last.clamp(min=0)[..., None].expand(B, T, F))
        return held * (last >= 0)[..., None].to(x.dtype)
    log_a = math.log1p(-1.0 / timescale)
    steps = torch.cumsum(m, dim=1)  # valid tokens seen so far: the clock of the decay
    acc = x.new_zeros(B, F)
    norm = x.new_zeros(B, 1)
    prev = x.new_zeros(B)
    out = []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        s = steps[:, c0:c1]  # [B, L]
        L = c1 - c0
        lag = s[:, :, None] - s[:, None, :]  # [B, L(t), L(s)]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        kernel = torch.where(causal, torch.exp(lag.clamp(min=0) * log_a), 0.0)
        kernel = kernel * ((1 - math.exp(log_a)) * m[:, None, c0:c1])
        carry = torch.exp((s - prev[:, None]) * log_a)[..., None]  # [B, L, 1]
        acc_c = kernel @ x[:, c0:c1] + carry * acc[:, None]
        norm_c = kernel.sum(-1, keepdim=True) + carry * norm[:, None]
        out.append(acc_c / norm_c.clamp_min(1e-12))
        acc, norm, prev = acc_c[:, -1], norm_c[:, -1], s[:, -1]
    return torch.cat(out, dim=1)


__all__ = ["causal_ema"]
