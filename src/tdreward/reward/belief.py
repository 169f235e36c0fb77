"""State representations for the critic (docs/design.md §2.2), behind one interface and a registry.

A state model maps the observation sequence [B, T, D] (projected hidden state plus the scalar
reward features known at step t) to a state sequence [B, T, S]. `belief`, the default, is the
belief-state model of Qian et al. (2025): a hidden-Markov filter over K latent states
(by default `wait` and `pre_transition`), run in log space and differentiable end to end.

Add one by subclassing BeliefStateModel and decorating it with @register_state("name").
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from tdreward.reward.averages import causal_ema
from tdreward.reward.config import RewardConfig

STATE_REGISTRY: dict[str, type[BeliefStateModel]] = {}

# Indices of the scalar features appended to the projected hidden state in an observation.
SURPRISAL, ASSOCIATION, ENTROPY = 0, 1, 2
N_FEATURES = 3


def register_state(name: str):
    """Class decorator: make a state model available as RewardConfig(state=name)."""

    def wrap(cls: type[BeliefStateModel]) -> type[BeliefStateModel]:
        cls.name = name
        STATE_REGISTRY[name] = cls
        return cls

    return wrap


def filter_step(log_b: Tensor, log_T: Tensor, log_emit: Tensor) -> Tensor:
    """One step of the log-space HMM filter: log b'(j) = log_softmax_j(logsumexp_i(
    log b(i) + log T[i, j]) + log O_j). Shared with the Qian et al. simulation (tdreward.neuro)."""
    pred = torch.logsumexp(log_b[..., :, None] + log_T, dim=-2)
    return torch.log_softmax(pred + log_emit, dim=-1)


def build_state_model(config: RewardConfig, obs_dim: int) -> BeliefStateModel:
    if config.state not in STATE_REGISTRY:
        raise ValueError(
            f"unknown state representation {config.state!r}; registered: {sorted(STATE_REGISTRY)}"
        )
    return STATE_REGISTRY[config.state](config, obs_dim)


@register_state("belief")
class BeliefStateModel(nn.Module):
    """Log-space HMM filter: b_t(j) ∝ sum_i b_{t-1}(i) T[i, j] O_j(o_t).

    T = softmax(A) row-wise, b before the first observation = softmax(pi),
    log O_j(o_t) = e_j(o_t) from a small network over the observation.
    """

    name: ClassVar[str]

    def __init__(self, config: RewardConfig, obs_dim: int) -> None:
        super().__init__()
        self.config = config
        self.obs_dim = obs_dim
        K = config.n_belief_states
        self.state_names = list(config.belief_state_names)
        # wait -> pre_transition with a small hazard; pre_transition stays until an
        # informative observation moves the belief (emissions start flat).
        T0 = torch.full((K, K), 1e-3)
        T0.fill_diagonal_(1.0)
        if K >= 2:
            T0[0, 1] = config.hazard
            T0[0, 0] = 1.0 - config.hazard
        T0 = T0 / T0.sum(-1, keepdim=True)
        self.transition_logits = nn.Parameter(T0.log())
        pi = torch.full((K,), 0.1 / max(K - 1, 1))
        pi[0] = 0.9
        self.initial_logits = nn.Parameter(pi.log())
        self.emission = nn.Sequential(
            nn.Linear(obs_dim, config.hidden_dim), nn.Tanh(), nn.Linear(config.hidden_dim, K)
        )
        nn.init.zeros_(self.emission[-1].weight)
        nn.init.zeros_(self.emission[-1].bias)

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    def forward(self, obs: Tensor, mask: Tensor) -> Tensor:
        """obs [B, T, D], mask [B, T] -> beliefs [B, T, K] (rows sum to 1, causal)."""
        log_T = torch.log_softmax(self.transition_logits, dim=-1)
        log_emit = self.emission(obs)  # [B, T, K]
        log_b = torch.log_softmax(self.initial_logits, dim=-1).expand(obs.shape[0], -1)
        out = []
        for t in range(obs.shape[1]):
            post = filter_step(log_b, log_T, log_emit[:, t])
            # Padding leaves the belief where it was.
            log_b = torch.where(mask[:, t, None].bool(), post, log_b)
            out.append(log_b)
        return torch.stack(out, dim=1).exp()


@register_state("csc")
class CSCStateModel(BeliefStateModel):
    """Complete serial compound: a one-hot clock of tokens since the last surprising token.

    An observed token whose surprisal exceeds `csc_threshold` nats is an event (the start of
    the text counts as one); the state is the bin min(t - last_event, csc_bins - 1).
    """

    def __init__(self, config: RewardConfig, obs_dim: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.obs_dim = obs_dim
        self.state_names = [f"t+{i}" for i in range(config.csc_bins)]

    def forward(self, obs: Tensor, mask: Tensor) -> Tensor:
        B, T, _ = obs.shape
        surprisal = obs[..., obs.shape[-1] - N_FEATURES + SURPRISAL] * FEATURE_SCALE[SURPRISAL]
        event = (surprisal > self.config.csc_threshold) & mask.bool()
        event[:, 0] = True
        pos = torch.arange(T, device=obs.device).expand(B, T)
        last = torch.cummax(torch.where(event, pos, torch.zeros_like(pos)), dim=1).values
        bins = (pos - last).clamp(max=self.config.csc_bins - 1)
        return nn.functional.one_hot(bins, self.config.csc_bins).to(obs.dtype)


@register_state("hidden")
class HiddenStateModel(BeliefStateModel):
    """No filter: the value function sees the projected hidden state alone."""

    def __init__(self, config: RewardConfig, obs_dim: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.obs_dim = obs_dim
        self.state_names = []

    def forward(self, obs: Tensor, mask: Tensor) -> Tensor:
        return obs.new_zeros(obs.shape[0], obs.shape[1], 0)


def context_features(obs_scalars: Tensor, mask: Tensor, timescales: list[float]) -> Tensor:
    """Causal exponential moving averages of the scalar observation features: [B, T, F * n],
    one block of F per time scale (tdreward.reward.averages: bias-corrected, so the first
    positions hold the running mean; padding holds the last value). obs_scalars [B, T, F]."""
    B, T, F = obs_scalars.shape
    if not timescales:
        return obs_scalars.new_zeros(B, T, 0)
    return torch.cat([causal_ema(obs_scalars, mask, ts) for ts in timescales], dim=-1)


# Observation features are divided by these so they enter the networks near unit scale.
FEATURE_SCALE = (10.0, 5.0, 10.0)


def observation_features(logp: Tensor, c: Tensor, entropy: Tensor) -> Tensor:
    """Scalar features known at step t, before x_{t+1} is seen: [B, T, 3].

    The surprisal and association of the token just observed (x_t, predicted at t-1; zero at
    t = 0) and the entropy of the prediction about to be tested. Using only what is known at
    t keeps V(s_t) a prediction, so delta_t is the error made on seeing x_{t+1}.
    logp, c: [B, T-1]; entropy: [B, T].
    """
    B, T = entropy.shape
    prev_surprisal = torch.cat([logp.new_zeros(B, 1), -logp], dim=1)[:, :T]
    prev_c = torch.cat([c.new_zeros(B, 1), c], dim=1)[:, :T]
    feats = torch.stack([prev_surprisal, prev_c, entropy], dim=-1)
    return feats / feats.new_tensor(FEATURE_SCALE)

