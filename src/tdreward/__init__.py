"""tdreward: a prospective, token-level temporal-difference reward for language models.

The public names are imported on first use (PEP 562), so `import tdreward.cli` and
`tdreward --help` do not pay for torch and transformers.
"""

from __future__ import annotations

import importlib

from tdreward.version import __version__

_LAZY = {
    "BeliefStateModel": "tdreward.reward",
    "RewardConfig": "tdreward.reward",
    "TDCritic": "tdreward.reward",
    "ValueFunction": "tdreward.reward",
    "register_state": "tdreward.reward",
    "TDRewardModel": "tdreward.reward_model",
    "TextScore": "tdreward.reward_model",
    "RewardSettings": "tdreward.reward_settings",
    "HardwareSettings": "tdreward.hardware",
    "load_reward_model": "tdreward.reward_model",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tdreward' has no attribute {name!r}")


def load_model(spec: str, **kwargs):
    """(model, tokenizer) for a scoring spec; see tdreward.backends.hf.load_model."""
    from tdreward.backends.hf import load_model as _load

    return _load(spec, **kwargs)


__all__ = ["__version__", "load_model", *_LAZY]
