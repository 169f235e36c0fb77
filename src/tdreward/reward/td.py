"""TD errors and returns (docs/design.md §2.3, §2.4). Pure torch, all positions at once.

Conventions: T states s_0..s_{T-1} (one per token); T-1 rewards r_0..r_{T-2}, r_t earned on
seeing x_{t+1}. `done` [B, T] marks terminal states (real end of a document, or EOS): their
value is taken as 0. A window cut by the context length is not terminal and bootstraps.
"""

from __future__ import annotations

import torch
from torch import Tensor


def td_errors(r: Tensor, values: Tensor, done: Tensor, gamma: float) -> Tensor:
    """delta_t = r_t + gamma V(s_{t+1}) (1 - done_{t+1}) - V(s_t); r [B, T-1], values [B, T]."""
    v_next = values[:, 1:] * (~done[:, 1:].bool())
    return r + gamma * v_next - values[:, :-1]


def centred_td_errors(r: Tensor, v_diff: Tensor, centre: Tensor, level: Tensor, done: Tensor,
                      gamma: float) -> Tensor:
    """Reward-centred TD errors (Naik, Wan, Sutton et al. 2024), [B, T-1]:
    delta_t = (r_t - m_t) + gamma Vd(s_{t+1}) - Vd(s_t), with the differential value
    Vd = V - m/(1 - gamma) (`v_diff`, [B, T]), the centre m (`centre`, [B, T]) and `level`
    = m/(1 - gamma). It equals r_t + gamma V(s_{t+1}) - V(s_t) with the centre of time t on
    both sides: the revision of the reward-rate estimate from m_t to m_{t+1}, multiplied by
    gamma/(1-gamma) (about 100), is the estimator's news, not the text's, and stays out of
    delta. Into a terminal state s_{t+1}: delta_t = r_t - V(s_t)."""
    notdone = ~done[:, 1:].bool()
    centred = r - centre[:, :-1] + gamma * v_diff[:, 1:] - v_diff[:, :-1]
    return torch.where(notdone, centred, r - v_diff[:, :-1] - level[:, :-1])


def discounted_return(r: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """sum_t gamma^t r_t over the valid rewards of each row: [B, T-1] -> [B]."""
    disc = gamma ** torch.arange(r.shape[1], device=r.device, dtype=r.dtype)
    return (r * mask * disc).sum(-1)


def lambda_returns(
    r: Tensor, values: Tensor, done: Tensor, mask: Tensor, gamma: float, lam: float,
    terminal_value: Tensor | None = None,
) -> Tensor:
    """TD(lambda) targets G^lambda_t for t = 0..T-2 (no gradient flows through `values`).

    G_t = r_t + gamma (1 - done_{t+1}) [(1 - lam) V_{t+1} + lam G_{t+1}], bootstrapping from
    V at the last valid state of a row unless it is terminal. mask [B, T-1] marks valid rewards.
    `terminal_value` [B, T-1]: the value of a terminal s_{t+1} (default 0); the centred
    critic's differential value of a terminal state is -m_t/(1-gamma), not 0.
    """
    values = values.detach()
    notdone = (~done.bool()).to(r.dtype)
    n = r.shape[1]
    G = torch.zeros_like(r)
    nxt = values[:, n]  # bootstrap for a row whose rewards run to the last column
    for t in range(n - 1, -1, -1):
        valid = mask[:, t].bool()
        # If t+1 is past the row's end, t is the row's last reward: bootstrap from V_{t+1}.
        last = valid & ~(mask[:, t + 1].bool() if t + 1 < n else torch.zeros_like(valid))
        blend = torch.where(last, values[:, t + 1], (1 - lam) * values[:, t + 1] + lam * nxt)
        end = 0.0 if terminal_value is None else terminal_value[:, t]
        g = r[:, t] + gamma * (notdone[:, t + 1] * blend + (1 - notdone[:, t + 1]) * end)
        G[:, t] = torch.where(valid, g, torch.zeros_like(g))
        nxt = G[:, t]
    return G
