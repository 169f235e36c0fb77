"""tdreward: a prospective, token-level temporal-difference reward for language models."""

__version__ = "0.1.0"

from tdreward.reward import (  # noqa: E402
    BeliefStateModel,
    RewardConfig,
    TDCritic,
    ValueFunction,
    register_state,
)
from tdreward.reward_model import TDRewardModel, TextScore  # noqa: E402


def load_model(spec: str, **kwargs):
    """(model, tokenizer) for a scoring spec; see tdreward.backends.hf.load_model."""
    from tdreward.backends.hf import load_model as _load

    return _load(spec, **kwargs)


__all__ = [
    "__version__", "BeliefStateModel", "RewardConfig", "TDCritic", "ValueFunction",
    "register_state", "TDRewardModel", "TextScore", "load_model",
]
