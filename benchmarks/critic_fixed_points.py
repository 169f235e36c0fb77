"""Can any critic meet both goals of train-critic? The TD fixed points of linear value families.

    tdreward train-critic --base_model embedded:smollm2-135m-instruct \\
        --dataset data/wikitext-2/wiki.test.small.raw --max_tokens 20000 --output_dir D
    python benchmarks/critic_fixed_points.py D [--json out.json]

Reads the reward model and the LM-feature cache that train-critic left in D, keeps its
document split, and for several families of linear values V(s_t) = w . phi_t solves exactly:

* LSTD(lambda): the fixed point that TD(lambda) with these features converges to (Boyan 2002),
  for lambda 0 and the critic's lambda;
* least squares on the Monte-Carlo returns (window-truncated, bootstrapped with the constant
  value of an average stream of rewards): the best predictor of the returns in that family.

For each it reports, on the held-out documents, the two goals of the issue (TD error mean
square / that of the untrained critic, V = 0, goal <= 0.5; explained variance of the
lambda-returns, goal >= 0.5) and the explained variance of the Monte-Carlo returns, which,
unlike the lambda-returns, do not contain the value's own bootstraps. The trained critic in D
is measured the same way. Features: constant; `slow` (moving averages over 100 and 1000 tokens
of surprisal, association and entropy); `context` (the critic's whole context: those scalars,
and their averages over 10, 100, 1000 tokens); `context+position` (plus position in the window).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tdreward.reward.belief import observation_features
from tdreward.reward.td import lambda_returns, td_errors
from tdreward.reward.terms import immediate_reward
from tdreward.reward_model import TDRewardModel
from tdreward.training.critic_trainer import split_documents, terminal_states, window_features

FAMILIES = ("constant", "slow", "context", "context+position")


def prepare(rm: TDRewardModel, data: dict, idx: torch.Tensor) -> dict:
    """Rewards, masks and every feature family for the windows `idx`."""
    cfg, critic = rm.config, rm.critic
    f = window_features(data, idx)
    c = critic.association(f)
    rmask = f.reward_mask.float()
    r = immediate_reward(f.logp, c, f.entropy[:, :-1], cfg.alpha, cfg.beta) * rmask
    context = critic.context(observation_features(f.logp, c, f.entropy), f.mask)  # [B, T, 12]
    n_win = f.mask.shape[1]
    pos = (torch.arange(n_win, dtype=torch.float32) / n_win)[None, :, None].expand(len(idx), -1, 1)
    ones = torch.ones_like(pos)
    with torch.no_grad():
        trained_values, _ = critic.values(f, c)
    return {"feats": f, "r": r, "rmask": rmask, "trained": trained_values, "phi": {
        "constant": ones,
        "slow": torch.cat([ones, context[..., 6:12]], -1),  # the 100- and 1000-token averages
        "context": torch.cat([ones, context], -1),
        "context+position": torch.cat([ones, context, pos, pos**2], -1),
    }}


def mc_returns(d: dict, gamma: float, bootstrap: float) -> torch.Tensor:
    """sum_k gamma^k r_{t+k} to the window's end, then the constant bootstrap: [B, T-1]
    (the lambda = 1 return with a constant value)."""
    constant = torch.full_like(d["trained"], bootstrap)
    return lambda_returns(d["r"], constant, d["feats"].done, d["rmask"], gamma, 1.0)


def measure(d: dict, values: torch.Tensor, gamma: float, lam: float, bootstrap: float) -> dict:
    f, r, rmask = d["feats"], d["r"], d["rmask"]
    m = rmask.bool()
    delta = td_errors(r, values, f.done, gamma) * rmask
    G = lambda_returns(r, values, f.done, rmask, gamma, lam)[m]
    mc = mc_returns(d, gamma, bootstrap)[m]
    v = values[:, :-1][m]
    return {"td_mse": float((delta**2).sum() / rmask.sum()),
            "ev_lambda_returns": float(1 - (G - v).var() / G.var()),
            "ev_mc_returns": float(1 - (mc - v).var() / mc.var())}


def lstd(d: dict, family: str, gamma: float, lam: float, ridge: float = 1.0) -> torch.Tensor:
    """w solving sum_t z_t (phi_t - gamma phi_{t+1})^T w = sum_t z_t r_t, z the eligibility."""
    phi, r, rmask = d["phi"][family], d["r"], d["rmask"]
    notdone = (~d["feats"].done.bool()).float()
    F = phi.shape[-1]
    A = ridge * torch.eye(F, dtype=torch.float64)
    b = torch.zeros(F, dtype=torch.float64)
    z = torch.zeros(phi.shape[0], F)
    for t in range(phi.shape[1] - 1):
        m = rmask[:, t : t + 1]
        z = (gamma * lam * z + phi[:, t]) * m
        step = (phi[:, t] - gamma * phi[:, t + 1] * notdone[:, t + 1 : t + 2]) * m
        A += z.double().T @ step.double()
        b += (z.double() * r[:, t : t + 1].double()).sum(0)
    return torch.linalg.solve(A, b).float()


def least_squares(d: dict, family: str, targets: torch.Tensor, ridge: float = 10.0):
    m = d["rmask"].bool()
    X, y = d["phi"][family][:, :-1][m], targets[m]
    A = X.T @ X + ridge * torch.eye(X.shape[1])
    A[0, 0] -= ridge  # the constant is not shrunk
    return torch.linalg.solve(A, X.T @ y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("critic_dir", help="a train-critic output directory (with its cache/)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    out = Path(args.critic_dir)
    rm = TDRewardModel.from_pretrained(out)
    metrics = json.loads((out / "metrics.json").read_text())
    tcfg = metrics["config"]
    data = load_file(str(out / "cache" / "features.safetensors"))
    data["done"] = terminal_states(rm, data, tcfg["doc_end_terminal"])
    train_idx, val_idx = split_documents(data, tcfg["val_fraction"], tcfg["seed"])
    gamma, lam = rm.config.gamma, rm.config.td_lambda
    train, val = prepare(rm, data, train_idx), prepare(rm, data, val_idx)
    mean_r = float(train["r"].sum() / train["rmask"].sum())
    bootstrap = mean_r / (1 - gamma)
    untrained = measure(val, torch.zeros_like(val["trained"]), gamma, lam, bootstrap)
    rows = [{"value": f"trained critic in {out} (state {rm.config.state})",
             **measure(val, val["trained"], gamma, lam, bootstrap)}]
    mc_train = mc_returns(train, gamma, bootstrap)
    for family in FAMILIES:
        for how in ("LSTD(0)", f"LSTD({lam:g})", "least squares on MC returns"):
            if how.startswith("LSTD"):
                w = lstd(train, family, gamma, 0.0 if how == "LSTD(0)" else lam)
            else:
                w = least_squares(train, family, mc_train)
            rows.append({"value": f"{family}: {how}",
                         **measure(val, val["phi"][family] @ w, gamma, lam, bootstrap)})
            if family == "constant":
                break  # the other fits of a constant are the same number
    print(f"held-out: {int(val['rmask'].sum())} rewards in {len(val_idx)} windows; untrained "
          f"critic (V = 0): TD mse {untrained['td_mse']:.2f}")
    print(f"{'value':58s} {'TD mse ratio':>12s} {'EV lambda-ret':>13s} {'EV MC-ret':>10s}")
    for row in rows:
        row["td_mse_ratio"] = row["td_mse"] / untrained["td_mse"]
        print(f"{row['value']:58s} {row['td_mse_ratio']:12.2f} {row['ev_lambda_returns']:13.3f} "
              f"{row['ev_mc_returns']:10.3f}")
    print("goals: TD mse ratio <= 0.5 and EV of the lambda-returns >= 0.5")
    if args.json:
        Path(args.json).write_text(json.dumps({"untrained": untrained, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
