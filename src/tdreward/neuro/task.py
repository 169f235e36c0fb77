"""The Pavlovian contingency task of Qian et al. (2025), in time bins.

A session is a sequence of trial slots. Each slot is an inter-trial interval (ITI) of null bins,
then a cue bin, `delay` - 1 null bins, and an outcome bin (reward or null) `delay` bins after
the cue. Slot types, as in the authors' value-RNN task code (github.com/mobeets/valuernn,
tasks/contingency.py): odour A (40% of slots), odour B (20%), and a third type X (40%) whose
cue is hidden or shown as odour C depending on the condition:

    condition     P(reward | A)  P(reward | B)  P(reward | X)  X shown as
    conditioning  0.75           0              0              (hidden: a longer ITI)
    degradation   0.75           0              0.75           hidden: uncued rewards in the ITI
    cued_reward   0.75           0              0.75           odour C, same delay
    extinction    0              0              0              hidden

So the extra rewards of `degradation` and `cued_reward` are the same events at the same times;
only odour C tells them apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CONDITIONS: tuple[str, ...] = ("conditioning", "degradation", "cued_reward", "extinction")

# Observation codes, one per bin.
NULL, ODOR_A, ODOR_B, ODOR_C, REWARD = 0, 1, 2, 3, 4
ODOURS = (ODOR_A, ODOR_B, ODOR_C)
N_OBS = 5

# Slot types.
SLOT_A, SLOT_B, SLOT_X = 0, 1, 2

# Per condition: reward probability of slot types A, B, X, and whether X shows odour C.
_CONDITION_TABLE: dict[str, tuple[tuple[float, float, float], bool]] = {
    "conditioning": ((0.75, 0.0, 0.0), False),
    "degradation": ((0.75, 0.0, 0.75), False),
    "cued_reward": ((0.75, 0.0, 0.75), True),
    "extinction": ((0.0, 0.0, 0.0), False),
}


@dataclass(frozen=True)
class TaskConfig:
    """Timing of the task, in bins of `dt` seconds (defaults: see docs/neuro.md)."""

    dt: float = 1.0 / 3.0  # seconds per bin
    delay: int = 9  # bins from odour onset to the outcome (3 s)
    iti_min: int = 20  # minimum ITI, bins
    iti_p: float = 1.0 / 8.0  # ITI = iti_min + Geometric(iti_p) - 1 bins
    slot_probs: tuple[float, float, float] = (0.4, 0.2, 0.4)  # A, B, X

    def __post_init__(self) -> None:
        if self.delay < 1 or self.iti_min < 1:
            raise ValueError("delay and iti_min must be at least one bin")
        if not 0.0 < self.iti_p <= 1.0:
            raise ValueError(f"iti_p must be in (0, 1], got {self.iti_p}")
        if abs(sum(self.slot_probs) - 1.0) > 1e-9:
            raise ValueError(f"slot_probs must sum to 1, got {self.slot_probs}")

    @property
    def mean_iti_s(self) -> float:
        return (self.iti_min + 1.0 / self.iti_p - 1.0) * self.dt

    def to_dict(self) -> dict:
        return {**asdict(self), "delay_s": self.delay * self.dt, "mean_iti_s": self.mean_iti_s}


def condition_spec(condition: str) -> tuple[tuple[float, float, float], bool]:
    """(reward probabilities of slots A, B, X; whether X shows odour C)."""
    if condition not in _CONDITION_TABLE:
        raise ValueError(f"unknown condition {condition!r}; choose from {CONDITIONS}")
    return _CONDITION_TABLE[condition]


@dataclass
class Session:
    """One simulated session: per-bin observations and where the odour-A trials are."""

    obs: np.ndarray  # [T] int8 observation codes
    slot_type: np.ndarray  # [n] SLOT_A / SLOT_B / SLOT_X
    onset: np.ndarray  # [n] bin of each slot's cue (shown or not)
    rewarded: np.ndarray  # [n] bool

    @property
    def reward(self) -> np.ndarray:
        """r_t, earned on seeing obs[t + 1] (the library's convention): [T - 1]."""
        return (self.obs[1:] == REWARD).astype(np.float64)


def make_session(condition: str, trials: int, rng: np.random.Generator,
                 cfg: TaskConfig = TaskConfig()) -> Session:
    """Draw `trials` slots of `condition` (exact type counts, shuffled), vectorised."""
    probs, show_c = condition_spec(condition)
    counts = np.round(np.asarray(cfg.slot_probs) * trials).astype(int)
    counts[0] += trials - counts.sum()  # rounding remainder goes to A
    types = np.repeat(np.arange(3), counts)
    rng.shuffle(types)
    iti = cfg.iti_min + rng.geometric(cfg.iti_p, size=trials) - 1
    rewarded = rng.random(trials) < np.asarray(probs)[types]

    length = iti + cfg.delay + 1
    start = np.concatenate([[0], np.cumsum(length)[:-1]])
    onset = start + iti
    obs = np.zeros(int(length.sum()), dtype=np.int8)
    cue = np.array([ODOR_A, ODOR_B, ODOR_C if show_c else NULL])[types]
    obs[onset] = cue
    obs[(onset + cfg.delay)[rewarded]] = REWARD
    return Session(obs=obs, slot_type=types, onset=onset, rewarded=rewarded)
