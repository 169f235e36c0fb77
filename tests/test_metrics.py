"""The critic diagnostics (tdreward.reward.metrics) on processes whose true values are known.

A Markov reward process with a few states, a known transition matrix and state-dependent
stochastic rewards: its true value function is the solution of the Bellman equation, and
what each diagnostic should give for it (and for V = 0, and for a constant) follows from the
process. No LM: every test is a few hundred milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from tdreward.reward.metrics import (
    DIAGNOSTIC_TIMESCALES,
    MIN_TOKENS_LEFT,
    critic_diagnostics,
    cross_validated_r2,
    discounted_returns_to_end,
    fold_ids,
    linear_value_ceiling,
    state_features,
)

# A sticky three-state chain; the reward's mean rises with the state, its noise is large.
P = torch.tensor([[0.96, 0.03, 0.01],
                  [0.02, 0.95, 0.03],
                  [0.01, 0.04, 0.95]], dtype=torch.float64)
MU = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)  # E[r_t | s_t]
SIGMA = 0.5  # r_t = MU[s_t] + SIGMA * noise
GAMMA = 0.9


def stationary(P: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eig(P.T)
    pi = v[:, torch.argmin((w - 1).abs())].real
    return pi / pi.sum()


def true_values(P: torch.Tensor, mu: torch.Tensor, gamma: float) -> torch.Tensor:
    """V = (I - gamma P)^-1 mu: the Bellman equation V(s) = mu(s) + gamma sum_s' P(s,s') V(s')."""
    return torch.linalg.solve(torch.eye(len(mu), dtype=P.dtype) - gamma * P, mu)


def expected_ev_mc(P: torch.Tensor, mu: torch.Tensor, sigma: float, gamma: float) -> float:
    """EV_MC of the true V in the stationary process (infinite horizon): 1 - E[Var(G|s)] /
    Var(G). The second moment M(s) = E[G^2 | s] solves M = mu^2 + sigma^2 + 2 gamma mu (P V)
    + gamma^2 P M (G = r + gamma G', r independent of G' given s)."""
    V = true_values(P, mu, gamma)
    eye = torch.eye(len(mu), dtype=P.dtype)
    M = torch.linalg.solve(eye - gamma**2 * P, mu**2 + sigma**2 + 2 * gamma * mu * (P @ V))
    pi = stationary(P)
    var_G = float(pi @ M - (pi @ V) ** 2)
    return 1.0 - float(pi @ (M - V**2)) / var_G


def sample_documents(n_docs: int, n_tokens: int, seed: int = 0) -> list[dict]:
    """Episodes of the process as documents of critic_diagnostics, the true V in "V" and its
    TD errors in "delta" (V of the state after the last token from the true next state: the
    document is a cut of a longer stream). H_t = s_t + small noise carries the state; logp_t is
    the log-probability of the transition s_t -> s_t+1 (seen at t+1); c is noise."""
    g = torch.Generator().manual_seed(seed)
    V_true = true_values(P, MU, GAMMA)
    pi = stationary(P)
    cum = P.cumsum(1)
    docs = []
    for _ in range(n_docs):
        u = torch.rand(n_tokens + 1, generator=g, dtype=torch.float64)
        s = [int(torch.searchsorted(pi.cumsum(0), u[0]).clamp(max=len(pi) - 1))]
        for x in u[1:].tolist():  # s_t+1 ~ P[s_t], by inverting the cumulative row
            s.append(min(int(torch.searchsorted(cum[s[-1]], x)), len(pi) - 1))
        s = torch.tensor(s)
        st, nxt = s[:-1], s[1:]
        r = MU[st] + SIGMA * torch.randn(n_tokens, generator=g, dtype=torch.float64)
        V = V_true[s]  # n_tokens + 1 states
        docs.append({
            "r": r,
            "V": V[:-1],
            "delta": r + GAMMA * V[1:] - V[:-1],
            "H": st.double() + 0.1 * torch.randn(n_tokens, generator=g, dtype=torch.float64),
            "logp": P[st, nxt].log(),
            "c": torch.rand(n_tokens, generator=g, dtype=torch.float64),
            "rbar": MU[st],
            "s": s,  # the true states, s_0..s_n (not a key critic_diagnostics reads)
        })
    return docs


N_DOCS, N_TOKENS = 8, 2000


def with_values(docs: list[dict], V_of_doc) -> list[dict]:
    """The same documents under another value: V_t from V_of_doc(doc) over the n + 1 true
    states (the last one the state after the last token), delta_t = r_t + gamma V_t+1 - V_t."""
    out = []
    for d in docs:
        V = V_of_doc(d).double()
        out.append(d | {"V": V[:-1], "delta": d["r"] + GAMMA * V[1:] - V[:-1]})
    return out


def mean_value() -> float:
    """E[V(s)] under the stationary distribution: the best constant value."""
    return float(stationary(P) @ true_values(P, MU, GAMMA))


VALUES = {  # V(s) of each variant, from the true states
    "true": lambda d: true_values(P, MU, GAMMA)[d["s"]],
    "zero": lambda d: torch.zeros(len(d["s"])),
    "half": lambda d: 0.5 * true_values(P, MU, GAMMA)[d["s"]],
    "constant": lambda d: torch.full((len(d["s"]),), mean_value()),
}


@pytest.fixture(scope="module")
def mrp_docs() -> list[dict]:
    return sample_documents(N_DOCS, N_TOKENS)


@pytest.fixture(scope="module")
def diagnose(mrp_docs):
    """critic_diagnostics of the process under a named value (VALUES), each computed once:
    the diagnostics' moving averages are the slow part on a loaded machine."""
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            done[name] = critic_diagnostics(with_values(mrp_docs, VALUES[name]), GAMMA)
        return done[name]

    return get


def test_the_true_value_leaves_nothing_predictable_in_delta(mrp_docs, diagnose):
    # with_values reproduces the documents' own TD errors of the true V exactly
    same = with_values(mrp_docs, VALUES["true"])
    assert all(torch.allclose(a["delta"], b["delta"]) for a, b in zip(same, mrp_docs))
    m = diagnose("true")
    assert m["n_tokens"] == N_DOCS * N_TOKENS and m["n_documents"] == N_DOCS
    assert abs(m["delta_r2"]) < 0.01, m
    assert abs(m["corr_delta_H"]) < 0.05, m
    assert abs(m["mean_delta"]) < 0.05, m
    # The one-step floor: Var(r - rbar) is the reward's own noise, and Var(delta) is above it.
    assert m["var_r_minus_rbar"] == pytest.approx(SIGMA**2, rel=0.05), m
    assert m["var_delta"] > m["var_r_minus_rbar"], m


def test_mean_squared_td_error_is_no_goal(diagnose):
    """In this stochastic process the true V's delta carries the news about the state (gamma
    V(s') - E[gamma V(s') | s]): V = 0 (delta = r) has a mean delta^2 far below the true V's."""
    assert diagnose("true")["mean_delta_sq"] > 2 * diagnose("zero")["mean_delta_sq"]


def test_v_zero_leaves_the_state_in_delta(diagnose):
    m = diagnose("zero")
    # delta = r: the state explains Var(MU[s]) / (Var(MU[s]) + sigma^2) of it (0.73 here).
    pi = stationary(P)
    explained = float(pi @ MU**2 - (pi @ MU) ** 2)
    explained /= explained + SIGMA**2
    assert m["delta_r2"] > 0.2 and m["delta_r2"] == pytest.approx(explained, abs=0.1), m
    assert m["corr_delta_H"] > 0.5, m
    # V = 0 predicts no return: EV_MC = 1 - E[G^2]/Var(G) <= 0.
    assert m["ev_mc"] <= 0.0, m


def test_a_wrongly_scaled_value_is_detected(diagnose):
    """Half the true value: delta = r + gamma V'/2 - V/2 still moves with the state."""
    m = diagnose("half")
    assert m["delta_r2"] > 0.1 and abs(m["corr_delta_H"]) > 0.2, m
    assert diagnose("true")["ev_mc"] > m["ev_mc"] > diagnose("zero")["ev_mc"]


def test_ev_mc_of_the_true_value_matches_the_process(diagnose):
    want = expected_ev_mc(P, MU, SIGMA, GAMMA)  # 0.666
    assert want > 0.5  # the process is built so that the state says most of the return
    m = diagnose("true")
    assert m["n_ev_positions"] == N_DOCS * (N_TOKENS - 460 + 1)
    assert m["ev_mc"] == pytest.approx(want, abs=0.06), (m["ev_mc"], want)


def test_a_constant_value_explains_no_return(diagnose):
    m = diagnose("constant")
    assert m["ev_mc"] <= 0.01, m
    # a constant's delta = r - (1 - gamma) k: V = 0's, shifted, as predictable
    assert m["delta_r2"] == pytest.approx(diagnose("zero")["delta_r2"], abs=1e-6), m
    assert m["mean_delta"] == pytest.approx(
        diagnose("zero")["mean_delta"] - (1 - GAMMA) * mean_value(), abs=1e-9)


def test_min_left_limits_the_ev_positions():
    docs = sample_documents(n_docs=2, n_tokens=300, seed=3)
    m = critic_diagnostics(docs, GAMMA)  # no position has 460 tokens left
    assert m["n_ev_positions"] == 0 and math.isnan(m["ev_mc"])
    m = critic_diagnostics(docs, GAMMA, min_left=100)
    assert m["n_ev_positions"] == 2 * 201 and not math.isnan(m["ev_mc"])


def test_discounted_returns_to_end_against_brute_force():
    g = torch.Generator().manual_seed(1)
    for gamma in (0.0, 0.5, 0.9, 0.99, 1.0):
        r = torch.randn(57, generator=g)
        G = discounted_returns_to_end(r, gamma)
        assert G.dtype == torch.float64 and G.shape == r.shape
        for t in range(len(r)):
            want = sum(gamma**k * float(r[t + k]) for k in range(len(r) - t))
            assert float(G[t]) == pytest.approx(want, abs=1e-9)
    assert discounted_returns_to_end(torch.zeros(0), 0.9).shape == (0,)


def test_cross_validated_r2_of_noise_is_zero_and_of_a_linear_target_one():
    g = torch.Generator().manual_seed(2)
    n, k = 6000, 8
    X = torch.randn(n, k, generator=g, dtype=torch.float64)
    groups = fold_ids([1000] * 6)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    assert cross_validated_r2(noise, X, groups) <= 0.01
    # The fit is out of fold: an in-sample fit of noise on 8 features would be > 0.
    assert cross_validated_r2(noise, X, groups) < 0.0
    w = torch.randn(k, generator=g, dtype=torch.float64)
    y = 3.0 + X @ w + 1e-3 * noise
    assert cross_validated_r2(y, X, groups) == pytest.approx(1.0, abs=1e-4)
    # Half the variance explained: R^2 about 1/2.
    y = X[:, 0] + noise
    assert cross_validated_r2(y, X, groups) == pytest.approx(0.5, abs=0.05)


def test_cross_validated_r2_of_a_single_fold_or_constant_is_nan():
    X = torch.randn(20, 3)
    assert math.isnan(cross_validated_r2(torch.randn(20), X, torch.zeros(20, dtype=torch.long)))
    assert math.isnan(cross_validated_r2(torch.ones(20), X, fold_ids([20])))


def test_fold_ids_gives_at_least_five_folds_for_one_document():
    ids = fold_ids([1000])
    assert ids.shape == (1000,)
    assert len(ids.unique()) >= 5
    assert bool((ids[1:] >= ids[:-1]).all())  # contiguous blocks
    ids = fold_ids([400, 700])  # two documents: blocks of each, none shared between them
    assert len(ids.unique()) >= 5
    assert not set(ids[:400].tolist()) & set(ids[400:].tolist())


def test_fold_ids_gives_one_fold_per_document_for_five_or_more():
    for lengths in ([10, 20, 30, 40, 50], [7] * 9):
        ids = fold_ids(lengths)
        assert len(ids.unique()) == len(lengths)
        start = 0
        for n in lengths:
            assert len(ids[start:start + n].unique()) == 1
            start += n


def test_state_features_see_only_the_past():
    """Changing r_t, logp_t or c_t moves no feature at t or before (they are known at s_t)."""
    g = torch.Generator().manual_seed(4)
    n = 50
    doc = {k: torch.randn(n, generator=g, dtype=torch.float64) for k in ("r", "H", "logp", "c")}
    X = state_features(doc)
    assert X.shape == (n, 3 + len(DIAGNOSTIC_TIMESCALES) + 1)
    t = 20
    for k in ("r", "logp", "c"):
        changed = dict(doc)
        changed[k] = doc[k].clone()
        changed[k][t] += 5.0
        Y = state_features(changed)
        assert torch.equal(X[: t + 1], Y[: t + 1]), k
        assert not torch.equal(X[t + 1 :], Y[t + 1 :]), k
    assert torch.equal(X[0, 1:6], torch.zeros(5))  # nothing seen at t = 0


def test_linear_ceiling_bounds_every_linear_value(mrp_docs, diagnose):
    """The in-sample least-squares fit is at least as good as any V linear in its features
    (here a + b rbar, fitted the same way, and the best constant), and here, where rbar names
    the state, it nearly reaches the true V's EV_MC; on pure-noise rewards it is near 0."""
    ceiling = linear_value_ceiling(mrp_docs, GAMMA)
    G = torch.cat([discounted_returns_to_end(d["r"], GAMMA)[:-MIN_TOKENS_LEFT + 1]
                   for d in mrp_docs])
    rb = torch.cat([d["rbar"][:-MIN_TOKENS_LEFT + 1] for d in mrp_docs])
    X = torch.stack([torch.ones_like(rb), rb], dim=1)
    fit = X @ torch.linalg.lstsq(X, G[:, None]).solution[:, 0]
    affine_ev = float(1 - ((G - fit) ** 2).mean() / G.var())
    assert 0.5 < affine_ev <= ceiling + 1e-9
    assert diagnose("constant")["ev_mc"] <= ceiling
    assert ceiling >= 0.95 * diagnose("true")["ev_mc"]
    assert ceiling <= 1.0
    g = torch.Generator().manual_seed(1)
    noise = [{"r": torch.randn(2000, generator=g, dtype=torch.float64),
              "rbar": torch.zeros(2000, dtype=torch.float64)} for _ in range(4)]
    assert abs(linear_value_ceiling(noise, GAMMA)) < 0.05
