"""The reward core: pure torch, no I/O (docs/design.md §2).

The names below are imported on first use (PEP 562): `tdreward.reward.config` (RewardConfig,
which command-line configs nest) stays light to import, so `tdreward --help` does not pay
for torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "STATE_REGISTRY": "belief", "BeliefStateModel": "belief", "CSCStateModel": "belief",
    "HiddenStateModel": "belief", "register_state": "belief",
    "RewardConfig": "config",
    "LMFeatures": "critic", "TDCritic": "critic",
    "centred_td_errors": "td", "discounted_return": "td", "lambda_returns": "td",
    "td_errors": "td",
    "expected_association": "terms", "expected_reward": "terms", "immediate_reward": "terms",
    "logprob_and_entropy": "terms", "next_token_stats": "terms",
    "retrospective_association": "terms",
    "causal_ema": "averages",
    "critic_diagnostics": "metrics",
    "ValueFunction": "value",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "STATE_REGISTRY", "BeliefStateModel", "CSCStateModel", "HiddenStateModel", "register_state",
    "RewardConfig", "LMFeatures", "TDCritic", "ValueFunction", "td_errors", "lambda_returns",
    "discounted_return", "immediate_reward", "logprob_and_entropy", "retrospective_association",
    "centred_td_errors", "expected_association", "expected_reward", "next_token_stats",
    "causal_ema", "critic_diagnostics",
]
