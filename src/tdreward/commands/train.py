"""`tdreward train`: PPO fine-tuning with TD-shaped per-token rewards (docs/ppo.md).

Runs unchanged under `accelerate launch` (DDP across processes or GPUs).
"""

from __future__ import annotations

import argparse

from tdreward.commands import add_command
from tdreward.flags import from_args
from tdreward.training.ppo_config import PPOConfig

ORDER = 30


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "train", PPOConfig, run,
        help="PPO fine-tuning with TD-shaped per-token rewards",
        description="Fine-tune a language model by PPO. Per-token reward: the critic's TD error "
        "delta_t minus kl_coef x KL(policy || reference); GAE advantages; clipped policy and "
        "value losses; the critic keeps learning online. Prompts come from --prompts or from "
        "windows of --dataset. Works under `accelerate launch`.")


def run(args: argparse.Namespace) -> int:
    cfg = from_args(PPOConfig, args)  # bad settings fail before the heavy imports
    from tdreward.training.ppo_trainer import train_ppo

    res = train_ppo(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process and res.metrics:
        last = res.metrics[-1]
        from tdreward.display import fmt_num

        # The KL estimate and the reward can be a hair below zero: no "-0.0000".
        print(f"PPO: {last['step']} steps; last step: TD reward "
              f"{fmt_num(last['reward'], '.4f')}, KL {fmt_num(last['kl'], '.4f')}, entropy "
              f"{last['entropy']:.3f}, {last['tokens_per_s']:.1f} tokens/s")
        print(f"outputs: {res.output_dir} (model_epoch_N/, reward_model_epoch_N/, "
              "metrics.jsonl, training_curve.png, checkpoints/)")
    return 0
