"""`tdreward train-critic`: learn the critic's head (and belief filter) by TD(lambda) on a corpus."""

from __future__ import annotations

import argparse

from tdreward.commands import add_command
from tdreward.flags import from_args
from tdreward.training.critic_config import CriticTrainingConfig

ORDER = 20


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "train-critic", CriticTrainingConfig, run, aliases=["train_critic"],
        help="learn the belief and value heads by TD(lambda) on a corpus")


def run(args: argparse.Namespace) -> int:
    from tdreward.display import fmt_num
    from tdreward.parallel import WorkerDone
    from tdreward.training.critic_trainer import train_critic

    cfg = from_args(CriticTrainingConfig, args)
    try:
        m = train_critic(cfg)
    except WorkerDone:  # under accelerate launch: this process's LM features are handed over
        return 0
    v, u = m["validation"], m["untrained_validation"]
    n_doc, n_tok = m["n_documents"]["validation"], m["n_tokens"]["validation"]
    print(f"held-out: {n_doc} document(s), {n_tok} tokens; best epoch {m['best_epoch']} "
          "(highest EV_MC)")
    print(f"{'critic':<10} {'EV_MC':>7} {'delta-R^2':>10} {'corr(delta,H)':>14} "
          f"{'mean delta':>11} {'mean delta^2':>13}")
    for name, d in (("untrained", u), ("trained", v)):
        print(f"{name:<10} {fmt_num(d.get('ev_mc'), '.3f'):>7} "
              f"{fmt_num(d.get('delta_r2'), '.4f'):>10} {fmt_num(d.get('corr_delta_H'), '+.3f'):>14} "
              f"{fmt_num(d.get('mean_delta'), '+.3f'):>11} {fmt_num(d.get('mean_delta_sq'), '.3f'):>13}")
    print(f"reward model: {cfg.output_dir} (metrics.json, learning_curve.png)")
    return 0
