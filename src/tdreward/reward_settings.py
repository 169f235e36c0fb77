"""Which TD reward a command uses: the settings every scoring or training config nests.

A light module (no torch): configs import it to build their flags, and `tdreward --help`
stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from tdreward.critic_files import check_critic_fits
from tdreward.flags import setting
from tdreward.validation import validate


@dataclass
class RewardSettings:
    """Which TD reward a command uses: a trained critic or untrained heads, and overrides of
    its reward weights (None keeps the critic's own). Nested in every config that scores."""

    reward_model_path: str | None = setting(
        None, help="trained critic (a `tdreward train-critic` output folder)",
        default_help="untrained heads, with a warning")
    alpha: float | None = setting(None, help="retrospective-association penalty",
                                  default_help="the critic's own; 0.1 untrained")
    beta: float | None = setting(None, help="exploration (entropy) bonus",
                                 default_help="the critic's own; 0.01 untrained")
    gamma: float | None = setting(None, help="TD discount",
                                  default_help="the critic's own; 0.99 untrained")

    def __post_init__(self) -> None:
        validate(self, {"gamma": "[0, 1]"})

    def overrides(self) -> dict:
        return {k: getattr(self, k) for k in ("alpha", "beta", "gamma")
                if getattr(self, k) is not None}

    def check_fits(self, spec: str | None, flag: str = "--base_model") -> dict | None:
        """The critic's config, checked against the model `spec` before anything loads."""
        if not self.reward_model_path:
            return None
        return check_critic_fits(self.reward_model_path, spec, flag)
