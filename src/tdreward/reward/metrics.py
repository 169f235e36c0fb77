"""Well-posed measures of a critic (docs/design.md §2.5), pure torch, per document.

Mean squared TD error is no goal: in a stochastic environment the true value function does
not minimise it (a V that moves with the text puts its moves into delta, and any constant
beats it). What the true V does satisfy, and what these measure:

- delta-R^2: E[delta_t | s_t] = 0, so nothing known at s_t predicts delta_t. The
  cross-validated R^2 (folds by document) of a ridge regression of delta_t on features known
  at s_t: H_t, surprisal and c of the token just seen, moving averages of r over 10/100/1000
  tokens up to the last reward, log position. About 0 for the true V.
- corr(delta, H): the same for the strongest single predictor.
- EV_MC: 1 - mean((G_t - V_t)^2) / Var(G_t), G_t the discounted sum of r to the end of the
  document, at positions with at least `min_left` tokens left (gamma^460 < 0.01, so G_t is
  nearly the infinite-horizon return there). How much of the actual return V predicts.

Each document is a dict of 1-D tensors over its predicted tokens: r, rbar, V, delta, H, logp,
c (V_t the value of the state that predicts token t+1, as `TextScore` lists them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tdreward.reward.averages import causal_ema

DIAGNOSTIC_TIMESCALES = (10.0, 100.0, 1000.0)
MIN_TOKENS_LEFT = 460


def discounted_returns_to_end(r: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{k>=0} gamma^k r_{t+k} up to the end of the document: [n] -> [n]."""
    G = torch.empty(r.shape[0], dtype=torch.float64)
    acc = 0.0
    for t, x in zip(range(r.shape[0] - 1, -1, -1), r.double().flip(0).tolist()):
        acc = x + gamma * acc
        G[t] = acc
    return G


def state_features(doc: dict[str, Tensor]) -> Tensor:
    """[n, 7] features known at s_t: H_t, surprisal and c of x_t (0 at t = 0), moving
    averages of r_0..r_{t-1} over DIAGNOSTIC_TIMESCALES (0 at t = 0), log(t + 1)."""
    n = doc["r"].shape[0]
    prev = lambda x: torch.cat([x.new_zeros(1), x[:-1]])  # noqa: E731
    r_seen = prev(doc["r"].float())
    ok = torch.ones(1, n)
    ok[0, 0] = 0  # nothing seen yet at t = 0
    slow = [causal_ema(r_seen[None, :, None], ok, ts)[0, :, 0] for ts in DIAGNOSTIC_TIMESCALES]
    cols = [doc["H"].float(), -prev(doc["logp"].float()), prev(doc["c"].float()), *slow,
            torch.log1p(torch.arange(n, dtype=torch.float32))]
    return torch.stack(cols, dim=1)


def cross_validated_r2(y: Tensor, X: Tensor, groups: Tensor, ridge: float = 1e-3) -> float:
    """Out-of-fold R^2 of a ridge regression of y [n] on X [n, k] (standardised on each
    training fold, plus an intercept), one fold per value of `groups`."""
    y, X = y.double(), X.double()
    pred = torch.empty_like(y)
    for g in groups.unique():
        test = groups == g
        train = ~test
        if not bool(train.any()):
            return math.nan
        mu, sd = X[train].mean(0), X[train].std(0).clamp_min(1e-8)
        A = torch.cat([(X[train] - mu) / sd, torch.ones(int(train.sum()), 1, dtype=X.dtype)], 1)
        reg = ridge * int(train.sum()) * torch.eye(A.shape[1], dtype=X.dtype)
        reg[-1, -1] = 0.0  # the intercept is not shrunk
        beta = torch.linalg.solve(A.T @ A + reg, A.T @ y[train])
        At = torch.cat([(X[test] - mu) / sd, torch.ones(int(test.sum()), 1, dtype=X.dtype)], 1)
        pred[test] = At @ beta
    sst = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / sst if sst > 0 else math.nan


def fold_ids(lengths: list[int], min_folds: int = 5) -> Tensor:
    """A fold per document; with fewer than `min_folds` documents, each is cut into
    contiguous blocks so that there are at least `min_folds` folds."""
    per_doc = max(1, math.ceil(min_folds / max(len(lengths), 1)))
    ids, k = [], 0
    for n in lengths:
        block = max(1, math.ceil(n / per_doc))
        ids.append(k + torch.arange(n) // block)
        k += per_doc
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def critic_diagnostics(docs: list[dict[str, Tensor]], gamma: float,
                       min_left: int = MIN_TOKENS_LEFT) -> dict[str, float]:
    """The critic's measures over documents (module docstring): mean delta, mean delta^2,
    Var(delta), Var(r - rbar) (the one-step floor of Var(delta)), delta-R^2, corr(delta, H),
    EV_MC and the token counts behind them."""
    docs = [d for d in docs if d["r"].shape[0] >= 2]
    if not docs:
        return {}
    cat = lambda k: torch.cat([d[k].double() for d in docs])  # noqa: E731
    delta, r, H = cat("delta"), cat("r"), cat("H")
    out = {
        "n_tokens": int(delta.shape[0]),
        "n_documents": len(docs),
        "mean_delta": float(delta.mean()),
        "mean_delta_sq": float((delta**2).mean()),
        "var_delta": float(delta.var()),
        "corr_delta_H": float(torch.corrcoef(torch.stack([delta, H]))[0, 1]),
    }
    if all("rbar" in d for d in docs):
        out["var_r_minus_rbar"] = float((r - cat("rbar")).var())
    X = torch.cat([state_features(d) for d in docs])
    out["delta_r2"] = cross_validated_r2(delta, X, fold_ids([d["r"].shape[0] for d in docs]))
    G, V = [], []
    for d in docs:
        n = d["r"].shape[0]
        keep = n - torch.arange(n) >= min_left
        if bool(keep.any()):
            G.append(discounted_returns_to_end(d["r"], gamma)[keep])
            V.append(d["V"].double()[:n][keep])
    if G:
        g, v = torch.cat(G), torch.cat(V)
        out["ev_mc"] = float(1 - ((g - v) ** 2).mean() / g.var()) if g.numel() > 1 else math.nan
        out["n_ev_positions"] = int(g.numel())
    else:
        out["ev_mc"], out["n_ev_positions"] = math.nan, 0
    return out


CEILING_TIMESCALES = (30.0, 100.0, 300.0, 1000.0, 3000.0)


def slow_value_features(doc: dict[str, Tensor]) -> Tensor:
    """[n, 12] what a value can know at s_t without the hidden state: 1, rbar_t, moving
    averages of rbar_0..rbar_t and of r_0..r_{t-1} (CEILING_TIMESCALES; r's without 30),
    log(t + 1)."""
    n = doc["r"].shape[0]
    ok = torch.ones(1, n)
    ema = lambda x, ts, m=ok: causal_ema(x.float()[None, :, None], m, ts)[0, :, 0]  # noqa: E731
    r_seen = torch.cat([doc["r"].new_zeros(1), doc["r"][:-1]])
    seen = ok.clone()
    seen[0, 0] = 0  # no reward seen yet at t = 0
    cols = [torch.ones(n), doc["rbar"].float()]
    cols += [ema(doc["rbar"], ts) for ts in CEILING_TIMESCALES]
    cols += [ema(r_seen, ts, seen) for ts in CEILING_TIMESCALES[1:]]
    cols.append(torch.log1p(torch.arange(n, dtype=torch.float32)))
    return torch.stack(cols, dim=1).double()


def linear_value_ceiling(docs: list[dict[str, Tensor]], gamma: float,
                         min_left: int = MIN_TOKENS_LEFT) -> float:
    """EV_MC of the least-squares fit of the returns G_t on `slow_value_features`, fitted on
    these documents' own returns (in-sample): an upper bound on the EV_MC of any V linear in
    those features, trained however, on these documents. Few features against thousands of
    positions: the in-sample optimism is small."""
    X, G = [], []
    for d in docs:
        n = d["r"].shape[0]
        keep = n - torch.arange(n) >= min_left
        if n >= 2 and bool(keep.any()):
            X.append(slow_value_features(d)[keep])
            G.append(discounted_returns_to_end(d["r"], gamma)[keep])
    if not G or sum(g.numel() for g in G) < 2:
        return math.nan
    X, g = torch.cat(X), torch.cat(G)
    w = torch.linalg.lstsq(X, g[:, None]).solution[:, 0]
    return float(1 - ((g - X @ w) ** 2).mean() / g.var())


def doc_from_score(ts) -> dict[str, Tensor]:
    """A `TextScore` (or its to_dict) as a document of critic_diagnostics."""
    if isinstance(ts, dict):
        rows = ts["tokens"]
        return {k: torch.tensor([row[k] for row in rows], dtype=torch.float64)
                for k in ("r", "rbar", "V", "delta", "H", "logp", "c") if rows and k in rows[0]}
    return {k: torch.tensor(getattr(ts, k), dtype=torch.float64)
            for k in ("r", "rbar", "V", "delta", "H", "logp", "c")}


__all__ = ["MIN_TOKENS_LEFT", "critic_diagnostics", "cross_validated_r2",
           "discounted_returns_to_end", "doc_from_score", "fold_ids", "linear_value_ceiling",
           "slow_value_features", "state_features"]
