"""The critic: base rate p0, state model (belief filter) and value function, in one module.

Pure torch. It reads what the frozen reference LM gives for a batch (final hidden states,
log p of each next token, predictive entropies, the exact expected association) and returns
per-token rewards, their one-step expectations, states, values and TD errors. Everything is
batched over positions except the belief filter's recursion.

The value has a known part and a learned part (docs/design.md §2.3):
V_t = rbar_t + gamma C_t,  C_t = m_t / (1 - gamma) + W_t,
rbar_t the reward the LM expects at t (exact), m_t the reward centre (a moving average of
rbar, learning-free) and W_t the learned head (0 before training). delta_t is reward-centred
(`centred_td_errors`), so an untrained critic already gives surprise relative to the LM's own
expectation: r_t - rbar_t plus how the next expectation departs from the recent average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tdreward.reward.averages import causal_ema
from tdreward.reward.belief import (
    N_FEATURES,
    build_state_model,
    context_features,
    observation_features,
)
from tdreward.reward.config import RewardConfig
from tdreward.reward.td import centred_td_errors, lambda_returns, td_errors
from tdreward.reward.terms import expected_reward, immediate_reward, retrospective_association
from tdreward.reward.value import ValueFunction


@dataclass
class LMFeatures:
    """What the reference LM says about a batch: the critic's only input besides token ids.

    input_ids, mask: [B, T]; hidden: [B, T, D]; logp: [B, T-1] (log p(x_{t+1} | x_<=t));
    entropy: [B, T] (of p(. | x_<=t)); done: [B, T] terminal states; expected_c: [B, T]
    E_p[c_t] of each prediction under the critic's p0, tau and lam (`expected_association`).
    """

    input_ids: Tensor
    mask: Tensor
    hidden: Tensor
    logp: Tensor
    entropy: Tensor
    done: Tensor
    expected_c: Tensor | None = field(default=None)

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

    def rbar(self, feats: LMFeatures) -> Tensor:
        """rbar_t = E_p[r_t], [B, T]: one per state (the last one's prediction too)."""
        if feats.expected_c is None:
            raise ValueError("LMFeatures without expected_c: extract them with the critic's "
                             "association settings (TDRewardModel.features)")
        cfg = self.config
        return expected_reward(feats.entropy, feats.expected_c, cfg.alpha, cfg.beta)

    def forward(self, feats: LMFeatures, c: Tensor | None = None) -> dict[str, Tensor]:
        """Per-token c, r, rbar, states, V and delta for a batch; [B, T-1] except noted."""
        cfg = self.config
        if c is None:
            c = self.association(feats)
        r = immediate_reward(feats.logp, c, feats.entropy[:, :-1], cfg.alpha, cfg.beta)
        parts = self.value_parts(feats, c)
        if cfg.value_form == "absolute":
            delta = td_errors(r, parts["values"], feats.done, cfg.gamma)
        else:
            delta = centred_td_errors(r, parts["v_diff"], parts["centre"], parts["level"],
                                      feats.done, cfg.gamma)
        if "rbar" not in parts and feats.expected_c is not None:  # reported by every form
            parts["rbar"] = self.rbar(feats)
        rmask = feats.reward_mask.to(r.dtype)
        return parts | {
            "c": c * rmask,
            "r": r * rmask,
            "delta": delta * rmask,
        }

    def context(self, scalars: Tensor, mask: Tensor) -> Tensor:
        """[scalars, their moving averages]: [B, T, context_dim] before standardisation."""
        slow = context_features(scalars, mask, self.config.context_timescales)
        return torch.cat([scalars, slow], dim=-1)

    def head(self, feats: LMFeatures, c: Tensor) -> tuple[Tensor, Tensor]:
        """The learned head W(s_t) in nats, [B, T], and the states, [B, T, S]."""
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

    def value_parts(self, feats: LMFeatures, c: Tensor) -> dict[str, Tensor]:
        """V(s_t) for every state ("values", [B, T]), the states ([B, T, S]) and, for the
        rbar form, its parts: rbar, the centre m, level = m/(1-gamma), the learned W and the
        differential value v_diff = V - level (all [B, T])."""
        cfg = self.config
        W, states = self.head(feats, c)
        if cfg.value_form == "absolute":
            return {"values": W, "states": states}
        rbar = self.rbar(feats)
        centre = causal_ema(rbar[..., None], feats.mask, cfg.centre_timescale)[..., 0]
        level = centre / (1 - cfg.gamma) if cfg.gamma < 1 else torch.zeros_like(centre)
        v_diff = rbar - centre + cfg.gamma * W
        return {"values": v_diff + level, "states": states, "rbar": rbar, "centre": centre,
                "level": level, "W": W, "v_diff": v_diff}

    def values(self, feats: LMFeatures, c: Tensor) -> tuple[Tensor, Tensor]:
        """V(s_t) for every state, [B, T], and the states, [B, T, S]."""
        parts = self.value_parts(feats, c)
        return parts["values"], parts["states"]

    def td_lambda_loss(self, feats: LMFeatures, out: dict[str, Tensor] | None = None) -> Tensor:
        """The TD(lambda) loss: mean (G^lambda_t - V(s_t))^2 over the valid rewards, in the
        critic's normalised units (divided by value_scale), the targets G^lambda from the
        current values with no gradient (tdreward.reward.td.lambda_returns).

        For the rbar form the targets are reward-centred: the differential value v_diff
        learns from r - m, and only W carries a gradient (rbar and m are known). `out` is
        this critic's forward on `feats` when the caller has it. What train-critic minimises
        and PPO's online critic step takes."""
        cfg = self.config
        out = self(feats) if out is None else out
        mask = feats.reward_mask.to(out["r"].dtype)
        if cfg.value_form == "absolute":
            G = lambda_returns(out["r"], out["values"], feats.done, mask, cfg.gamma, cfg.td_lambda)
            err = G - out["values"][:, :-1]
        else:
            centre, v_diff = out["centre"], out["v_diff"]
            terminal = -out["level"][:, :-1]  # V of a terminal state is 0
            G = lambda_returns((out["r"] - centre[:, :-1]) * mask, v_diff, feats.done, mask,
                               cfg.gamma, cfg.td_lambda, terminal)
            err = G - v_diff[:, :-1]
        err = err / self.value_scale
        return (err**2 * mask).sum() / mask.sum().clamp(min=1)
