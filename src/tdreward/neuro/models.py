"""State representations of Qian et al. (2025), Fig. 3c, for TD(0) with V = w . x.

Every representation here is a deterministic function of the observations, and in this task
each informative observation (an odour, a reward, the end of an odour's delay) resets it. So a
representation is a table of feature rows plus a rule giving the row of each bin:

    in an odour's delay:  row = cue * delay + d        (d = bins since odour onset)
    in the ITI:           row = 3 * delay + min(u, n_iti_rows - 1)
                          (u = bins since the last reset: end of a delay, or any reward)

    csc          complete serial compound over each odour's delay; no ITI features (x = 0).
    csc_iti      the same plus a serial compound of ITI states (time since reset; last absorbs).
    cue_context  the CSC plus one context feature that is on in every bin.
    belief       the Belief-State model: beliefs over delay substates per odour, Wait and Pre,
                 from the HMM filter b' ∝ b (T ⊙ O[:, :, x]) run by `belief_update`. The
                 table holds the belief for every reachable history; `belief_table` checks the
                 reset property it relies on, and tests compare it with the filter run bin by
                 bin over a whole session.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tdreward.neuro.task import N_OBS, NULL, ODOR_A, ODOURS, REWARD, TaskConfig
from tdreward.reward.belief import filter_step

MODELS: tuple[str, ...] = ("csc", "csc_iti", "cue_context", "belief")
N_CUES = len(ODOURS)


def belief_update(log_b: Tensor, log_T: Tensor, log_obs: Tensor) -> Tensor:
    """log b'(j) = log_softmax_j(logsumexp_i(log b(i) + log T[i, j] + log O(x | i, j))).

    log_b: [..., K] log belief before the observation; log_T: [K, K], T[i, j] = P(s'=j | s=i).
    log_obs: the observation's log likelihood, either per transition [K, K] (O[i, j, x], as in
    Qian et al. and Starkweather et al.) or per destination state [..., K] (O_j(x), as in
    BeliefStateModel). A per-transition likelihood is folded into T, so both go through the
    same step: logsumexp over previous states, add the log likelihood, normalise.
    """
    if log_obs.dim() == 2 and log_obs.shape == log_T.shape:
        return filter_step(log_b, log_T + log_obs, torch.zeros_like(log_b))
    return filter_step(log_b, log_T, log_obs)


@dataclass(frozen=True)
class BeliefSpec:
    """The Belief-State model's hidden states and its (T, O)."""

    log_T: Tensor  # [K, K]
    log_O: Tensor  # [K, K, N_OBS], log P(x | s=i, s'=j)
    wait: int
    pre: int

    @property
    def n_states(self) -> int:
        return self.log_T.shape[0]


def belief_spec(cfg: TaskConfig, hazard: float | None = None,
                pre_rate: float | None = None) -> BeliefSpec:
    """Delay substates (per odour), Wait and Pre.

    Wait -> Pre with fixed probability `hazard` per bin (default 1 / iti_min: the mean wait
    equals the minimum ITI). The model leaves Pre only on an observation: an odour (to that
    odour's first substate) or a reward (to Wait), each at rate `pre_rate` (default iti_p, the
    task's per-bin hazard after the minimum ITI) split equally. A delay's last substate goes to
    Wait with a reward or a null observation.
    """
    n = cfg.delay
    p = 1.0 / cfg.iti_min if hazard is None else hazard
    q = cfg.iti_p if pre_rate is None else pre_rate
    K = N_CUES * n + 2
    wait, pre = K - 2, K - 1
    T = np.zeros((K, K))
    Ob = np.zeros((K, K, N_OBS))
    for c, odour in enumerate(ODOURS):
        first = c * n
        for d in range(n - 1):
            T[first + d, first + d + 1] = 1.0
            Ob[first + d, first + d + 1, NULL] = 1.0
        T[first + n - 1, wait] = 1.0
        Ob[first + n - 1, wait, [NULL, REWARD]] = 0.5
        T[pre, first] = q / (N_CUES + 1)
        Ob[pre, first, odour] = 1.0
    T[pre, wait] = q / (N_CUES + 1)
    Ob[pre, wait, REWARD] = 1.0
    T[pre, pre] = 1.0 - q
    Ob[pre, pre, NULL] = 1.0
    T[wait, wait], T[wait, pre] = 1.0 - p, p
    Ob[wait, [wait, pre], NULL] = 1.0
    with np.errstate(divide="ignore"):
        return BeliefSpec(torch.from_numpy(np.log(T)), torch.from_numpy(np.log(Ob)), wait, pre)


def _update(log_b: Tensor, spec: BeliefSpec, x: int) -> Tensor:
    return belief_update(log_b, spec.log_T, spec.log_O[:, :, x])


def _onehot_log(K: int, i: int) -> Tensor:
    b = torch.full((K,), float("-inf"), dtype=torch.float64)
    b[i] = 0.0
    return b


def belief_table(cfg: TaskConfig, spec: BeliefSpec | None = None, tol: float = 1e-12,
                 max_iti_rows: int = 4000) -> np.ndarray:
    """Beliefs for every reachable history: [N_CUES * delay + n_iti_rows, K], rows sum to 1.

    Rows c * delay + d: d bins after odour c. Rows after those: u = 0, 1, ... null bins after
    a reset, until the belief stops changing (to `tol`). Raises if an informative observation
    does not reset the belief, since the table would then not be the filter.
    """
    spec = belief_spec(cfg) if spec is None else spec
    K, n = spec.n_states, cfg.delay
    iti = [_onehot_log(K, spec.wait)]
    while len(iti) < max_iti_rows:
        nxt = _update(iti[-1], spec, NULL)
        if torch.allclose(nxt.exp(), iti[-1].exp(), rtol=0.0, atol=tol):
            break
        iti.append(nxt)
    priors = [iti[min(cfg.iti_min, len(iti) - 1)], iti[-1]]
    isi = []
    for odour in ODOURS:
        rows = [_update(priors[0], spec, odour)]
        for _ in range(n - 1):
            rows.append(_update(rows[-1], spec, NULL))
        isi.extend(rows)
        # Reset checks: the odour from another prior, and both ends of the delay.
        _check_same(_update(priors[1], spec, odour), rows[0], f"odour {odour}")
        for x in (NULL, REWARD):
            _check_same(_update(rows[-1], spec, x), iti[0], f"end of delay ({x})")
    for prior in priors:
        _check_same(_update(prior, spec, REWARD), iti[0], "uncued reward")
    table = torch.stack(isi + iti).exp().numpy()
    return table


def _check_same(a: Tensor, b: Tensor, what: str) -> None:
    if not torch.allclose(a.exp(), b.exp(), rtol=0.0, atol=1e-9):
        raise ValueError(f"belief not reset by {what}: the belief table would not be exact")


@dataclass(frozen=True)
class Timeline:
    """Where each bin is: in an odour's delay (cue, d) or in the ITI (u)."""

    in_isi: np.ndarray  # [T] bool
    cue: np.ndarray  # [T] 0..2 (valid where in_isi)
    d: np.ndarray  # [T] bins since odour onset (valid where in_isi)
    u: np.ndarray  # [T] bins since the last reset (valid where not in_isi)


def timeline(obs: np.ndarray, cfg: TaskConfig) -> Timeline:
    """Vectorised: last odour and last reset by cumulative max (like CSCStateModel)."""
    T = len(obs)
    t = np.arange(T)
    is_odour = np.isin(obs, ODOURS)
    last_odour = np.maximum.accumulate(np.where(is_odour, t, -1))
    reset = obs == REWARD
    ends = t[is_odour] + cfg.delay
    reset[ends[ends < T]] = True
    reset[0] = True
    last_reset = np.maximum.accumulate(np.where(reset, t, 0))
    in_isi = last_odour > last_reset
    cue = np.where(in_isi, obs[np.maximum(last_odour, 0)] - ODOR_A, 0)
    return Timeline(in_isi, cue, t - last_odour, t - last_reset)


@dataclass(frozen=True)
class Representation:
    name: str
    table: np.ndarray  # [N_CUES * delay + n_iti_rows, K]
    delay: int

    @property
    def n_iti_rows(self) -> int:
        return self.table.shape[0] - N_CUES * self.delay

    def index(self, tl: Timeline) -> np.ndarray:
        """Row of `table` for every bin: [T] int."""
        isi_row = tl.cue * self.delay + tl.d
        iti_row = N_CUES * self.delay + np.minimum(tl.u, self.n_iti_rows - 1)
        return np.where(tl.in_isi, isi_row, iti_row)


def n_iti_states(cfg: TaskConfig) -> int:
    """ITI states of csc_iti: the minimum ITI plus two mean geometric tails (last absorbs)."""
    return cfg.iti_min + int(np.ceil(2.0 / cfg.iti_p))


def build_representation(model: str, cfg: TaskConfig) -> Representation:
    n_isi = N_CUES * cfg.delay
    eye = np.eye(n_isi)
    if model == "csc":
        table = np.vstack([eye, np.zeros((1, n_isi))])
    elif model == "csc_iti":
        table = np.eye(n_isi + n_iti_states(cfg))
    elif model == "cue_context":
        table = np.hstack([np.vstack([eye, np.zeros((1, n_isi))]), np.ones((n_isi + 1, 1))])
    elif model == "belief":
        table = belief_table(cfg)
    else:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    return Representation(model, table, cfg.delay)
