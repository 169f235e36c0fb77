"""The immediate-reward terms of DESIGN §2.1, for all positions at once.

Pure torch. Shapes: B texts, T tokens, V vocabulary, D hidden size. Position t predicts token
t+1, so per-prediction tensors have T-1 columns (the last token has no target).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def logprob_and_entropy(
    hidden: Tensor,
    lm_head: torch.nn.Module,
    targets: Tensor,
    chunk_elems: int = 1 << 23,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """log p(target) and predictive entropy (nats) from final hidden states.

    hidden [..., D], targets [...] (any value where there is no target; mask it later).
    The logits are built a chunk of positions at a time, so peak memory is about
    chunk_elems floats instead of B x T x V.
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    vocab = lm_head.weight.shape[0]
    step = max(1, chunk_elems // vocab)
    logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    ent = torch.empty_like(logp)
    for i in range(0, h.shape[0], step):
        logits = lm_head(h[i : i + step]).float()  # a fresh tensor: safe to modify in place
        if softcap:
            logits = torch.tanh_(logits.div_(softcap)).mul_(softcap)
        # One exp pass serves both, on logits shifted in place by their max (l <= 0):
        # log Z = log sum e^l, log p = l - log Z, H = log Z - sum(e^l * l) / Z.
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        e = torch.exp(logits)
        z = e.sum(-1)
        log_z = torch.log(z)
        tgt = y[i : i + step].clamp(0, logits.shape[-1] - 1)
        logp[i : i + step] = logits.gather(1, tgt[:, None]).squeeze(1) - log_z
        ent[i : i + step] = log_z - torch.linalg.vecdot(e, logits) / z
    return logp.view(shape), ent.view(shape)


def trace_horizon(tau: float, length: int) -> int:
    """How far back eligibility traces reach: weights below 1e-12 are dropped."""
    return max(1, min(length, math.ceil(tau * 12 * math.log(10))))


def retrospective_association(
    input_ids: Tensor,
    mask: Tensor,
    log_p0: Tensor,
    tau: float,
    lam: float,
    query_chunk: int = 2048,
) -> Tensor:
    """c_t of DESIGN §2.1 for the outcome x_{t+1} of every position t.

    E_t(v) = sum_{s<=t, x_s=v} exp(-(t-s)/tau); q_t = E_t / sum_u E_t(u);
    c_t = log((1-lam) p0(x_{t+1}) + lam q_t(x_{t+1})) - log p0(x_{t+1}).
    input_ids, mask: [B, T]; returns [B, T-1]. Only tokens with mask 1 enter the traces.
    """
    B, T = input_ids.shape
    n = T - 1
    if n <= 0:
        return input_ids.new_zeros((B, 0), dtype=torch.float32)
    H = trace_horizon(tau, T)
    device = input_ids.device
    # Keys padded on the left so that window k of query t covers tokens t-H+1 .. t.
    keys = F.pad(input_ids, (H - 1, 0), value=-1)
    kmask = F.pad(mask.bool(), (H - 1, 0), value=False)
    keys = torch.where(kmask, keys, torch.full_like(keys, -1))
    ages = torch.arange(H - 1, -1, -1, device=device, dtype=torch.float32)
    w = torch.exp(-ages / tau)  # weight of each slot in a window, oldest first
    targets = input_ids[:, 1:]
    E = torch.empty(B, n, device=device)
    Z = torch.empty(B, n, device=device)
    for a in range(0, n, query_chunk):
        b = min(n, a + query_chunk)
        win = keys[:, a : b + H - 1].unfold(1, H, 1)  # [B, b-a, H]
        wmask = kmask[:, a : b + H - 1].unfold(1, H, 1)
        E[:, a:b] = ((win == targets[:, a:b, None]) * w).sum(-1)
        Z[:, a:b] = (wmask * w).sum(-1)
    q = E / Z.clamp_min(1e-30)
    lp0 = log_p0[targets.clamp(0, log_p0.shape[0] - 1)]
    mix = torch.logaddexp(math.log1p(-lam) + lp0, math.log(lam) + torch.log(q)) if lam > 0 else lp0
    return mix - lp0


def immediate_reward(logp: Tensor, c: Tensor, entropy: Tensor, alpha: float, beta: float) -> Tensor:
    """r_t = log p(x_{t+1} | x_<=t) - alpha c_t + beta H_t."""
    return logp - alpha * c + beta * entropy
