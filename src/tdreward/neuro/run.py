"""Run the contingency task with every model: TD(0) online, vectorised over a batch of
(model, condition, seed) agents, with the library's `td_errors` computing every delta."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tdreward.io import write_json
from tdreward.neuro.models import MODELS, Representation, build_representation, timeline
from tdreward.neuro.task import CONDITIONS, SLOT_A, Session, TaskConfig, make_session
from tdreward.reward.td import td_errors

GAMMA = 0.83  # per bin (1/3 s); the authors' value-RNN discount for this task
ALPHA = 0.1  # TD(0) learning rate, as in Gershman's belief-state TD code
MEASURE_FRAC = 0.25  # cue/reward RPEs: mean over the last quarter of a phase's trials
N_BLOCKS = 10  # learning curves: cue RPE per tenth of a phase
TRACE_PRE_S, TRACE_POST_S = 2.0, 6.0  # value/RPE traces around odour-A onset
SEED_BATCH = 5  # seeds simulated together (one vectorised batch)
_CHUNK = 512  # bins of features gathered at once


def _expand(names: list[str] | tuple[str, ...], known: tuple[str, ...], what: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        for m in known if n == "all" else [n]:
            if m not in known:
                raise ValueError(f"unknown {what} {m!r}; choose from {known} or 'all'")
            if m not in out:
                out.append(m)
    if not out:
        raise ValueError(f"no {what} given")
    return [m for m in known if m in out]


@dataclass
class _Agent:
    """One batch element: a model's representation on one session."""

    model: str
    key: tuple  # (phase, condition, seed)
    session: Session
    idx: np.ndarray  # [T] row of the concatenated feature table


def _probe_positions(s: Session, cfg: TaskConfig, pre: int, post: int) -> dict[str, np.ndarray]:
    """Bins to read for each odour-A trial (delta index t means the error on entering t+1)."""
    a = s.slot_type == SLOT_A
    onset, rewarded = s.onset[a], s.rewarded[a]
    slot = np.flatnonzero(a)
    fits = (onset - pre >= 1) & (onset + post < len(s.obs) - 1)
    span = np.arange(-pre, post + 1)
    return {
        "cue": onset - 1,  # delta_{t0-1} = gamma V(t0) - V(t0 - 1): the odour-A response
        "outcome": onset + cfg.delay - 1,  # delta on entering the outcome bin
        "rewarded": rewarded,
        "slot": slot,
        "trace_v": (onset[fits, None] + span).ravel(),  # V_t
        "trace_d": (onset[fits, None] + span - 1).ravel(),  # delta on entering t
        "trace_rewarded": rewarded[fits],
        "trace_slot": slot[fits],
    }


def _run_td(agents: list[_Agent], table: np.ndarray, w: np.ndarray, gamma: float,
            alpha: float, probes: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Online TD(0) over all agents at once; returns delta and V at the probed (agent, bin).

    Each bin: V_t and V_{t+1} under the current weights, delta_t = td_errors(r_t, V, done),
    then w += alpha delta_t x_t. Agents past the end of their session are frozen (mask 0).
    """
    B = len(agents)
    lengths = np.array([len(a.idx) for a in agents])
    T = int(lengths.max())
    idx = np.zeros((B, T), dtype=np.int32)
    reward = np.zeros((B, T - 1), dtype=np.float32)  # 0/1: exact; promoted by td_errors
    for i, a in enumerate(agents):
        idx[i, : len(a.idx)] = a.idx
        idx[i, len(a.idx):] = a.idx[-1]
        reward[i, : len(a.idx) - 1] = a.session.reward
    live = np.arange(T - 1)[None] < (lengths - 1)[:, None]
    R = torch.from_numpy(reward)
    done = torch.zeros(B, 2, dtype=torch.bool)  # a continuing task: no terminal states
    vals = np.empty((B, 2))
    vals_t = torch.from_numpy(vals)
    out = {k: (np.empty(len(b)), np.empty(len(b))) for k, (b, _) in probes.items()}
    with torch.no_grad():
        for c0 in range(0, T - 1, _CHUNK):
            c1 = min(c0 + _CHUNK, T - 1)
            X = table[idx[:, c0 : c1 + 1]]  # [B, L + 1, K]
            step = alpha * live[:, c0:c1]
            D = np.empty((B, c1 - c0))
            V = np.empty((B, c1 - c0))
            for i in range(c1 - c0):
                np.einsum("blk,bk->bl", X[:, i : i + 2], w, out=vals)
                d = td_errors(R[:, c0 + i : c0 + i + 1], vals_t, done, gamma).numpy()[:, 0]
                D[:, i] = d
                V[:, i] = vals[:, 0]
                w += (step[:, i] * d)[:, None] * X[:, i]
            for k, (b, t) in probes.items():
                lo, hi = np.searchsorted(t, [c0, c1])
                out[k][0][lo:hi] = D[b[lo:hi], t[lo:hi] - c0]
                out[k][1][lo:hi] = V[b[lo:hi], t[lo:hi] - c0]
    return out


def _simulate(agents: list[_Agent], table: np.ndarray, w: np.ndarray, gamma: float,
              alpha: float, cfg: TaskConfig, trials: int) -> dict[tuple, dict]:
    """Run a batch and reduce its probes to per-agent summaries."""
    pre = round(TRACE_PRE_S / cfg.dt)
    post = round(TRACE_POST_S / cfg.dt)
    pos = [_probe_positions(a.session, cfg, pre, post) for a in agents]
    probes = {}
    for k in ("cue", "outcome", "trace_v", "trace_d"):
        b = np.concatenate([np.full(len(p[k]), i) for i, p in enumerate(pos)])
        t = np.concatenate([p[k] for p in pos])
        order = np.argsort(t, kind="stable")
        probes[k] = (b[order], t[order], order)
    raw = _run_td(agents, table, w, gamma, alpha, {k: v[:2] for k, v in probes.items()})
    got = {}
    for k, (_, _, order) in probes.items():
        d, v = np.empty_like(raw[k][0]), np.empty_like(raw[k][1])
        d[order], v[order] = raw[k]
        got[k] = (d, v)
    first_measured = int(math.floor((1.0 - MEASURE_FRAC) * trials))
    summaries: dict[tuple, dict] = {}
    offs = {k: np.cumsum([0] + [len(p[k]) for p in pos]) for k in probes}
    for i, (a, p) in enumerate(zip(agents, pos, strict=True)):
        cue = got["cue"][0][offs["cue"][i] : offs["cue"][i + 1]]
        outcome = got["outcome"][0][offs["outcome"][i] : offs["outcome"][i + 1]]
        late = p["slot"] >= first_measured
        span = pre + post + 1
        tv = got["trace_v"][1][offs["trace_v"][i] : offs["trace_v"][i + 1]].reshape(-1, span)
        td = got["trace_d"][0][offs["trace_d"][i] : offs["trace_d"][i + 1]].reshape(-1, span)
        tlate = p["trace_slot"] >= first_measured
        blocks = np.minimum(p["slot"] * N_BLOCKS // trials, N_BLOCKS - 1)
        summaries[(a.model, *a.key)] = {
            "cue_rpe": _mean(cue[late]),
            "reward_rpe": _mean(outcome[late & p["rewarded"]]),
            "omission_rpe": _mean(outcome[late & ~p["rewarded"]]),
            "cue_rpe_curve": [_mean(cue[blocks == j]) for j in range(N_BLOCKS)],
            "value_trace": _mean_rows(tv[tlate]),
            "rpe_trace_rewarded": _mean_rows(td[tlate & p["trace_rewarded"]]),
            "rpe_trace_all": _mean_rows(td[tlate]),
        }
    return summaries


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def _mean_rows(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=0) if len(x) else np.full(x.shape[1], np.nan)


def _stats(values: list) -> dict:
    """mean, sem, sd over seeds (NaN-free), and the per-seed values."""
    a = np.asarray(values, dtype=float)
    n = a.shape[0]
    sd = a.std(axis=0, ddof=1) if n > 1 else np.zeros_like(a[0])
    return {
        "mean": _json(a.mean(axis=0)),
        "sem": _json(sd / math.sqrt(n)),
        "sd": _json(sd),
        "per_seed": _json(a),
    }


def _json(x):
    """numpy -> JSON-able, NaN -> None."""
    x = np.asarray(x, dtype=float)
    if x.ndim == 0:
        return None if math.isnan(float(x)) else float(f"{float(x):.7g}")
    return [_json(v) for v in x]


def _concat_tables(reps: dict[str, Representation]) -> tuple[np.ndarray, dict[str, int]]:
    K = max(r.table.shape[1] for r in reps.values())
    offsets, rows, off = {}, [], 0
    for name, r in reps.items():
        offsets[name] = off
        rows.append(np.pad(r.table, ((0, 0), (0, K - r.table.shape[1]))))
        off += r.table.shape[0]
    return np.vstack(rows), offsets


def run_neuro(
    conditions: list[str],
    models: list[str],
    trials: int = 4000,
    seeds: int = 25,
    output_dir: str | Path = "neuro_out",
    gamma: float = GAMMA,
    alpha: float = ALPHA,
    progress: bool = True,
    task: TaskConfig | None = None,
) -> dict:
    """Simulate Qian et al. (2025): every (condition, model, seed); write results.json and
    fig3.png to `output_dir`; return the results dict (the content of results.json).

    Each seed first learns `trials` slots of conditioning (phase 1). Each condition is then a
    phase 2 of `trials` slots that starts from that seed's phase-1 weights (conditioning in
    phase 2 is continued conditioning), as in the paper's Phase I -> Phase II design.
    `gamma` is per bin of task.dt seconds. Seeds are 0..seeds-1. Each (seed, phase) has its
    own numpy Generator; the phase-2 conditions of a seed reuse the same draws (common random
    numbers: same slot order, ITIs and reward draws, so degradation and cued_reward deliver
    the extra rewards at the same bins). All models see the same sessions, and results do not
    depend on which other conditions or models are run.
    """
    t_start = time.perf_counter()
    cfg = TaskConfig() if task is None else task
    conds = _expand(conditions, CONDITIONS, "condition")
    mods = _expand(models, MODELS, "model")
    if trials < 8 or seeds < 1:
        raise ValueError("need trials >= 8 and seeds >= 1")
    reps = {m: build_representation(m, cfg) for m in mods}
    table, offsets = _concat_tables(reps)
    K = table.shape[1]

    per: dict[tuple, dict] = {}
    bar = tqdm(total=seeds, unit="seed", desc="neuro", disable=not progress)
    for g0 in range(0, seeds, SEED_BATCH):
        group = list(range(g0, min(g0 + SEED_BATCH, seeds)))
        s1 = {s: make_session("conditioning", trials, _rng(s, 0), cfg) for s in group}
        a1 = _agents(mods, reps, offsets, {("phase1", "conditioning", s): v for s, v in s1.items()},
                     cfg)
        w1 = np.zeros((len(a1), K))
        per.update(_simulate(a1, table, w1, gamma, alpha, cfg, trials))
        w_end = {(a.model, a.key[2]): w1[i].copy() for i, a in enumerate(a1)}
        s2 = {("phase2", c, s): make_session(c, trials, _rng(s, 1), cfg)
              for c in conds for s in group}
        a2 = _agents(mods, reps, offsets, s2, cfg)
        w2 = np.stack([w_end[(a.model, a.key[2])] for a in a2])
        per.update(_simulate(a2, table, w2, gamma, alpha, cfg, trials))
        bar.update(len(group))
    bar.close()

    results = _collect(per, conds, mods, seeds)
    pre = round(TRACE_PRE_S / cfg.dt)
    post = round(TRACE_POST_S / cfg.dt)
    out = {
        "paper": "Qian et al., Nat Neurosci 28:1280-1292 (2025), doi:10.1038/s41593-025-01915-4",
        "conditions": conds,
        "models": mods,
        "config": {
            "trials_per_phase": trials, "seeds": seeds, "gamma_per_bin": gamma,
            "alpha": alpha, "measure_frac": MEASURE_FRAC, "n_blocks": N_BLOCKS,
            "task": cfg.to_dict(),
            "n_features": {m: int(r.table.shape[1]) for m, r in reps.items()},
        },
        "trace_time_s": _json(np.arange(-pre, post + 1) * cfg.dt),
        "results": results,
    }
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from tdreward.neuro.plot import plot_fig3  # matplotlib only when writing

    out["figure"] = str(out_dir / "fig3.png")
    plot_fig3(out, out["figure"])
    out["runtime_s"] = round(time.perf_counter() - t_start, 2)
    out["results_json"] = str(out_dir / "results.json")
    write_json(out["results_json"], out)
    return out


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _agents(models: list[str], reps: dict[str, Representation], offsets: dict[str, int],
            sessions: dict[tuple, Session], cfg: TaskConfig) -> list[_Agent]:
    tls = {k: timeline(s.obs, cfg) for k, s in sessions.items()}
    return [
        _Agent(m, k, s, offsets[m] + reps[m].index(tls[k]))
        for m in models for k, s in sessions.items()
    ]


def _collect(per: dict[tuple, dict], conds: list[str], mods: list[str], seeds: int) -> dict:
    """results[condition][model] and results['phase1'][model]: stats over seeds."""
    keys = ("cue_rpe", "reward_rpe", "omission_rpe", "cue_rpe_curve", "value_trace",
            "rpe_trace_rewarded", "rpe_trace_all")
    res: dict[str, dict] = {}
    for phase, cond in [("phase1", "conditioning")] + [("phase2", c) for c in conds]:
        name = "phase1" if phase == "phase1" else cond
        res[name] = {}
        for m in mods:
            rows = [per[(m, phase, cond, s)] for s in range(seeds)]
            entry = {k: _stats([r[k] for r in rows]) for k in keys}
            base = np.array([per[(m, "phase1", "conditioning", s)]["cue_rpe"]
                             for s in range(seeds)])
            entry["cue_rpe_normalized"] = _stats(np.array([r["cue_rpe"] for r in rows]) / base)
            res[name][m] = entry
    return res
