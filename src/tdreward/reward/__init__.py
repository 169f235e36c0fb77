"""The reward core: pure torch, no I/O (docs/design.md §2)."""

from tdreward.reward.belief import (
    STATE_REGISTRY,
    BeliefStateModel,
    CSCStateModel,
    HiddenStateModel,
    register_state,
)
from tdreward.reward.config import RewardConfig
from tdreward.reward.critic import LMFeatures, TDCritic
from tdreward.reward.td import discounted_return, lambda_returns, td_errors
from tdreward.reward.terms import immediate_reward, logprob_and_entropy, retrospective_association
from tdreward.reward.value import ValueFunction

__all__ = [
    "STATE_REGISTRY", "BeliefStateModel", "CSCStateModel", "HiddenStateModel", "register_state",
    "RewardConfig", "LMFeatures", "TDCritic", "ValueFunction", "td_errors", "lambda_returns",
    "discounted_return", "immediate_reward", "logprob_and_entropy", "retrospective_association",
]
