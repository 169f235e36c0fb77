"""GRPO with the TD reward: TRL's GRPOTrainer, `tdreward.integrations.trl.TDRewardFunction`.

    pip install -e '.[trl]'
    python examples/trl_grpo.py --policy embedded:smollm2-135m-instruct \\
        --reward_model_path CRITIC_DIR --prompts data/eval_prompts.jsonl \\
        --max_steps 2 --output_dir /tmp/grpo_td --lora

The reward model (reference LM + trained critic) is loaded once; TRL calls it on every batch of
generations and each completion gets its TD reward (mean delta over its tokens). With --lora
the policy trains a LoRA adapter (targets chosen per architecture, as `tdreward lora` does).
RLOOTrainer takes the same `reward_funcs=`.
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from tdreward.data import load_prompts
from tdreward.integrations.trl import TDRewardFunction
from tdreward.training.lora_trainer import default_target_modules, resolve_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="embedded:smollm2-135m-instruct", help="model spec")
    ap.add_argument("--reward_model_path", help="trained critic (default: untrained heads)")
    ap.add_argument("--prompts", default="data/eval_prompts.jsonl")
    ap.add_argument("--output_dir", default="/tmp/grpo_td")
    ap.add_argument("--max_steps", type=int, default=2)
    ap.add_argument("--num_generations", type=int, default=4)
    ap.add_argument("--max_completion_length", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lora", action="store_true", help="train a LoRA adapter, not all weights")
    args = ap.parse_args()

    where = resolve_model_dir(args.policy)  # embedded/gguf: the dequantised safetensors cache
    tokenizer = AutoTokenizer.from_pretrained(where)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
    reward = TDRewardFunction.from_pretrained(args.reward_model_path, base_model=args.policy)

    prompts = [e.prompt for e in load_prompts(args.prompts)]
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                 target_modules=default_target_modules(policy))
    config = GRPOConfig(
        output_dir=args.output_dir, per_device_train_batch_size=args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        max_steps=args.max_steps, learning_rate=args.lr, logging_steps=1, report_to="none",
        save_strategy="no", bf16=False, use_cpu=not torch.cuda.is_available(), beta=0.0,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=tokenizer, peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    for h in trainer.state.log_history:
        if "rewards/td_reward/mean" in h:
            print(f"step {h.get('step', '?')}: TD reward mean {h['rewards/td_reward/mean']:.4f} "
                  f"(std {h['rewards/td_reward/std']:.4f})")
    # save_pretrained, not trainer.save_model: that also writes training_args.bin (a pickle).
    trainer.model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"{trainer.state.global_step} GRPO steps in {time.perf_counter() - start:.1f} s; "
          f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
