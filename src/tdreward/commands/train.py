"""`tdreward train`: PPO fine-tuning with TD-shaped per-token rewards (docs/ppo.md).

Runs unchanged under `accelerate launch` (DDP across processes or GPUs).
"""

from __future__ import annotations

import argparse

from tdreward.commands import DEFAULT_MODEL, flag, reward_flags

ORDER = 30


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train", parents=[common], help="PPO fine-tuning with TD-shaped per-token rewards",
        description="Fine-tune a language model by PPO. Per-token reward: the critic's TD error "
        "delta_t minus kl_coef x KL(policy || reference); GAE advantages; clipped policy and "
        "value losses; the critic keeps learning online. Prompts come from --prompts or from "
        "windows of --dataset. Works under `accelerate launch`.")
    g = p.add_argument_group("model and data")
    flag(g, "--base_model", default=DEFAULT_MODEL, help=f"policy to fine-tune ({DEFAULT_MODEL})")
    reward_flags(g)
    g.add_argument("--prompts", help="prompt file (.jsonl with a 'prompt' key, or .txt)")
    g.add_argument("--dataset", help="corpus (HF dataset name or local file/folder) whose "
                   "windows become prompts, when no --prompts")
    flag(g, "--dataset_config", help="HF dataset config, e.g. wikitext-2-raw-v1")
    g.add_argument("--split", default="train", help="HF dataset split (train)")
    flag(g, "--text_field", default="text", help="text column of the dataset (text)")
    flag(g, "--prompt_tokens", type=int, default=64, help="tokens per corpus window (64)")
    flag(g, "--max_prompts", type=int, default=10_000, help="corpus windows to keep (10000)")
    flag(g, "--no_chat_template", action="store_true",
         help="do not wrap prompt-file prompts in the tokenizer's chat template")
    flag(g, "--max_length", type=int, default=512,
         help="longest prompt in tokens; longer prompts are cut from the left (512)")
    flag(g, "--output_dir", default="output", help="where models, critic and metrics go")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=3)
    flag(g, "--steps_per_epoch", type=int, help="PPO steps per epoch (one pass over prompts)")
    flag(g, "--batch_size", type=int, default=4, help="prompts per step per process (4)")
    flag(g, "--mini_batch_size", type=int, default=2, help="rollouts per gradient step (2)")
    flag(g, "--ppo_epochs", type=int, default=4, help="passes over each rollout batch (4)")
    g = p.add_argument_group("generation")
    flag(g, "--max_new_tokens", type=int, default=48, help="response length limit (48)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    g = p.add_argument_group("PPO")
    g.add_argument("--lr", type=float, help="learning rate (1e-4 with LoRA, else 1e-5)")
    flag(g, "--kl_coef", type=float, default=0.05, help="per-token KL penalty weight (0.05)")
    flag(g, "--kl_estimator", choices=("k1", "k3"), default="k1",
         help="per-token KL estimate: k1 = log pi/ref, k3 = (r-1) - log r (k1)")
    g.add_argument("--cliprange", type=float, default=0.2, help="policy ratio clip (0.2)")
    flag(g, "--cliprange_value", type=float, default=0.2, help="value clip (0.2)")
    flag(g, "--vf_coef", type=float, default=0.1, help="value loss weight (0.1)")
    flag(g, "--ent_coef", type=float, default=0.0, help="entropy bonus weight (0)")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda (0.95)")
    flag(g, "--max_grad_norm", type=float, default=1.0, help="gradient clipping (1.0)")
    flag(g, "--critic_lr", type=float, default=1e-4, help="online critic learning rate (1e-4)")
    flag(g, "--freeze_critic", action="store_true", help="no online TD learning of the critic")
    flag(g, "--eos_terminal", action="store_true",
         help="EOS ends the critic's episode (V = 0 after it); off by default, see docs/ppo.md")
    g = p.add_argument_group("LoRA")
    flag(g, "--use_lora", action="store_true",
         help="train a LoRA adapter; the reference is the base with the adapter disabled")
    flag(g, "--lora_r", type=int, default=16)
    flag(g, "--lora_alpha", type=int, default=32)
    flag(g, "--lora_dropout", type=float, default=0.0)
    flag(g, "--target_modules", nargs="+",
         help="modules to adapt (PEFT's default for the architecture; or all-linear)")
    g.add_argument("--merge", action="store_true",
                   help="save model_epoch_N with the adapter merged into the weights")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    flag(g, "--save_steps", type=int, default=0,
         help="checkpoint every N steps as well as at each epoch end (0)")
    flag(g, "--save_total_limit", type=int, default=2, help="checkpoints to keep (2)")
    flag(g, "--resume_from_checkpoint",
         help="a checkpoint directory, an output directory, or `latest`")
    flag(g, "--report_to", choices=("tensorboard", "wandb"),
         help="also log to this tracker (through accelerate)")
    flag(g, "--max_nan_streak", type=int, default=5,
         help="stop after this many NaN/inf losses in a row (5)")
    flag(g, "--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tdreward.training.ppo_trainer import PPOConfig, train_ppo

    cfg = PPOConfig(
        base_model=args.base_model, reward_model_path=args.reward_model_path,
        prompts=args.prompts, dataset=args.dataset, dataset_config=args.dataset_config,
        split=args.split, text_field=args.text_field, prompt_tokens=args.prompt_tokens,
        max_prompts=args.max_prompts, chat_template=not args.no_chat_template,
        output_dir=args.output_dir, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        max_length=args.max_length, lr=args.lr, kl_coef=args.kl_coef,
        kl_estimator=args.kl_estimator, cliprange=args.cliprange,
        cliprange_value=args.cliprange_value, vf_coef=args.vf_coef, ent_coef=args.ent_coef,
        lam=args.lam, max_grad_norm=args.max_grad_norm, critic_lr=args.critic_lr,
        critic_updates=not args.freeze_critic, eos_terminal=args.eos_terminal,
        use_lora=args.use_lora, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules, merge=args.merge, seed=args.seed,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint, report_to=args.report_to,
        max_nan_streak=args.max_nan_streak, progress=not args.no_progress,
    )
    if cfg.merge and not cfg.use_lora:
        from tdreward.errors import TDRewardError

        raise TDRewardError("--merge needs --use_lora (without LoRA the full model is saved)")
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
