"""Qian et al. (2025): contingency degradation, cued rewards and extinction, simulated with the
library's TD errors and its log-space belief recursion. See docs/neuro.md."""

from tdreward.neuro.models import MODELS, belief_update
from tdreward.neuro.run import run_neuro
from tdreward.neuro.task import CONDITIONS, TaskConfig

__all__ = ["CONDITIONS", "MODELS", "TaskConfig", "belief_update", "run_neuro"]
