"""`tdreward train-critic`: learn the belief and value heads by TD(lambda) on a corpus."""

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
    from tdreward.training.critic_trainer import train_critic

    cfg = from_args(CriticTrainingConfig, args)
    m = train_critic(cfg)
    v, u = m["validation"], m["untrained_validation"]
    print(f"held-out TD error (mean square): {v['td_mse']:.3f} trained vs {u['td_mse']:.3f} "
          f"untrained (ratio {m['td_mse_ratio_vs_untrained']:.2f}); explained variance of "
          f"the lambda-returns {fmt_num(v['explained_variance'], '.3f')}; best epoch "
          f"{m['best_epoch']}")
    print(f"reward model: {cfg.output_dir} (metrics.json, learning_curve.png)")
    return 0
