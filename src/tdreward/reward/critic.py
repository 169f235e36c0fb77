"""The critic: base rate p0, state model (belief filter) and value function, in one module.

Pure torch. It reads what the frozen reference LM gives for a batch (final hidden states,
log p of each next token, predictive entropies) and returns per-token rewards, states, values
and TD errors. Everything is batched over positions except the belief filter's recursion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tdreward.reward.belief import (
    N_FEATURES,
    build_state_model,
    context_features,
    observation_features,
)
from tdreward.reward.config import RewardConfig
from tdreward.reward.td import lambda_returns, td_errors
from tdreward.reward.terms import immediate_reward, retrospective_association
from tdreward.reward.value import ValueFunction


@dataclass
class LMFeatures:
    """What the reference LM says about a batch: the critic's only input besides token ids.

    input_ids, mask: [B, T]; hidden: [B, T, D]; logp: [B, T-1] (log p(x_{t+1} | x_<=t));
    entropy: [B, T] (of p(. | x_<=t)); done: [B, T] terminal states.
    """

    input_ids: Tensor
    mask: Tensor
    hidden: Tensor
    logp: Tensor
    entropy: Tensor
    done: Tensor

    @property
    def reward_mask(self) -> Tensor:
        """[B, T-1]: position t has a target x_{t+1} inside the text."""
        return self.mask[:, 1:]


class TDCritic(nn.Module):
    def __init__(self, config: RewardConfig, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        # Uniform base rate until a corpus gives one (train-critic estimates it).
        self.register_buffer("log_p0", torch.full((vocab_size,), -math.log(vocab_size)))
        # V = value_offset + value_scale * head(.): values reach r / (1 - gamma), so the head
        # predicts in normalised units and the critic stores the scale.
        self.register_buffer("value_offset", torch.zeros(()))
        self.register_buffer("value_scale", torch.ones(()))
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.proj = nn.Linear(hidden_size, config.proj_dim)
        self.state_model = build_state_model(config, config.proj_dim + N_FEATURES)
        self.context_dim = N_FEATURES * (1 + len(config.context_timescales))
        # Standardisation of [scalars, slow context], set from a corpus by train-critic: the
        # moving averages vary far less than one token's features.
        self.register_buffer("context_mean", torch.zeros(self.context_dim))
        self.register_buffer("context_std", torch.ones(self.context_dim))
        value_in = self.state_model.state_dim + self.context_dim
        if config.context_timescales and config.value_uses_hidden:
            value_in += config.proj_dim
        elif not config.context_timescales:  # the original layout: V = MLP([proj(h); b])
            value_in = config.proj_dim + self.state_model.state_dim
        self.value = ValueFunction(value_in, config.hidden_dim)

    @property
    def state_names(self) -> list[str]:
        return self.state_model.state_names

    def set_base_rate(self, counts: Tensor) -> None:
        """p0 from unigram counts, add-one smoothed."""
        p0 = (counts.double() + 1.0) / (counts.double().sum() + counts.numel())
        self.log_p0.copy_(p0.log().float())

    def association(self, feats: LMFeatures) -> Tensor:
        cfg = self.config
        return retrospective_association(feats.input_ids, feats.mask, self.log_p0, cfg.tau, cfg.lam)

    def forward(self, feats: LMFeatures, c: Tensor | None = None) -> dict[str, Tensor]:
        """Per-token c, r, states, V and delta for a batch; all [B, T-1] except noted."""
        cfg = self.config
        if c is None:
            c = self.association(feats)
        r = immediate_reward(feats.logp, c, feats.entropy[:, :-1], cfg.alpha, cfg.beta)
        values, states = self.values(feats, c)
        delta = td_errors(r, values, feats.done, cfg.gamma)
        rmask = feats.reward_mask.to(r.dtype)
        return {
            "c": c * rmask,
            "r": r * rmask,
            "values": values,  # [B, T]: one per state s_0..s_{T-1}
            "states": states,  # [B, T, S]
            "delta": delta * rmask,
        }

    def context(self, scalars: Tensor, mask: Tensor) -> Tensor:
        """[scalars, their moving averages]: [B, T, context_dim] before standardisation."""
        slow = context_features(scalars, mask, self.config.context_timescales)
        return torch.cat([scalars, slow], dim=-1)

    def values(self, feats: LMFeatures, c: Tensor) -> tuple[Tensor, Tensor]:
        """V(s_t) for every state, [B, T], and the states, [B, T, S]."""
        cfg = self.config
        z = self.proj(self.norm(feats.hidden.float()))
        scalars = observation_features(feats.logp, c, feats.entropy)
        states = self.state_model(torch.cat([z, scalars], dim=-1), feats.mask)
        if cfg.context_timescales:
            ctx = (self.context(scalars, feats.mask) - self.context_mean) / self.context_std
            parts = ([z] if cfg.value_uses_hidden else []) + [states, ctx]
        else:
            parts = [z, states]
        v = self.value(torch.cat(parts, dim=-1))
        return self.value_offset + self.value_scale * v, states

    def td_lambda_loss(self, values: Tensor, r: Tensor, done: Tensor, mask: Tensor,
                       gamma: float, lam: float) -> Tensor:
        """The TD(lambda) loss: mean (G^lambda_t - V(s_t))^2 over the valid rewards, in the
        critic's normalised units (divided by value_scale), the targets G^lambda from
        `values` with no gradient (tdreward.reward.td.lambda_returns).

        values [B, T] (from `values`), r [B, T-1], done [B, T], mask [B, T-1] (1 where a
        reward is valid). What train-critic minimises and PPO's online critic step takes.
        """
        G = lambda_returns(r, values, done, mask, gamma, lam)
        err = (G - values[:, :-1]) / self.value_scale
        return (err**2 * mask).sum() / mask.sum().clamp(min=1)
