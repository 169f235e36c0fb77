"""`tdreward lora`: LoRA / QLoRA fine-tuning with a TD-weighted loss (docs/lora.md)."""

from __future__ import annotations

import argparse

from tdreward.commands import add_command
from tdreward.flags import from_args
from tdreward.training.lora_config import LoraTrainingConfig

ORDER = 40


def register(sub, common: argparse.ArgumentParser) -> None:
    add_command(
        sub, common, "lora", LoraTrainingConfig, run,
        help="LoRA/QLoRA fine-tuning with a TD-weighted loss",
        description="Fine-tune a LoRA adapter with the causal-LM loss weighted per token by "
        "w_t = min(exp(A_t / temperature), w_max), A_t the TD error delta_t of the frozen base "
        "(the adapter disabled) less its batch mean. --reward_scale 0 is plain SFT. A .jsonl of "
        "prompt/completion pairs trains on the completion tokens only.")


def run(args: argparse.Namespace) -> int:
    cfg = from_args(LoraTrainingConfig, args)  # bad settings fail before the heavy imports
    from tdreward.training.lora_setup import describe_examples
    from tdreward.training.lora_trainer import run_lora

    m = run_lora(cfg)
    b, a = m["before"], m["after"]
    print(f"trained {m['global_steps']} steps in {m['train_wall_s']:.1f} s on "
          f"{describe_examples(m['data']['examples'], m['data']['kind'])}; LoRA on "
          f"{', '.join(m['target_modules'])}")
    if b and a:
        line = f"training-set loss (plain CE) {b['sft_loss']:.4f} -> {a['sft_loss']:.4f}"
        if "td_weighted_loss" in b:
            line += (f"; TD-weighted {b['td_weighted_loss']:.4f} -> "
                     f"{a['td_weighted_loss']:.4f}")
        print(line + f" (first {m['eval_examples']} examples)")
    print(f"adapter: {cfg.output_dir} (adapter_config.json, adapter_model.safetensors, "
          "tdreward_lora.json)")
    if m.get("merged_dir"):
        print(f"merged model: {m['merged_dir']}")
    return 0
