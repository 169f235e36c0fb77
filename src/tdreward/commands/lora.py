"""`tdreward lora`: LoRA / QLoRA fine-tuning with a TD-weighted loss (docs/lora.md)."""

from __future__ import annotations

import argparse

from tdreward.commands import DEFAULT_MODEL, flag, reward_flags

ORDER = 40


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "lora", parents=[common], help="LoRA/QLoRA fine-tuning with a TD-weighted loss",
        description="Fine-tune a LoRA adapter with the causal-LM loss weighted per token by "
        "w_t = min(exp(A_t / temperature), w_max), A_t the TD error delta_t of the frozen base "
        "(the adapter disabled) less its batch mean. --reward_scale 0 is plain SFT. A .jsonl of prompt/completion "
        "pairs trains on the completion tokens only.")
    flag(p, "--base_model", default=DEFAULT_MODEL,
         help=f"model spec to fine-tune: hub id (gpt2), directory, gguf:PATH or embedded:NAME "
         f"(default {DEFAULT_MODEL})")
    p.add_argument("--dataset", required=True,
                   help="HF dataset name (wikitext), local .txt/.jsonl/.parquet file or folder, "
                   "or a .jsonl of {prompt, completion} pairs")
    flag(p, "--dataset_config", help="HF dataset config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="train", help="HF dataset split (default train)")
    flag(p, "--output_dir", default="./lora_output",
         help="where the adapter (adapter_config.json + safetensors) is written")
    g = p.add_argument_group("LoRA")
    flag(g, "--lora_r", type=int, default=8, help="rank (8)")
    flag(g, "--lora_alpha", type=int, default=16, help="scaling alpha (16)")
    flag(g, "--lora_dropout", type=float, default=0.05, help="dropout (0.05)")
    flag(g, "--target_modules", nargs="+",
         help="layer names to adapt (space or comma separated); default per architecture: "
         "GPT-2 c_attn c_proj c_fc, Llama/Gemma q,k,v,o,gate,up,down_proj, else all linear")
    q = g.add_mutually_exclusive_group()
    flag(q, "--use_8bit", action="store_true", help="8-bit base through bitsandbytes")
    flag(q, "--use_4bit", action="store_true",
         help="4-bit base (NF4, double quantisation) through bitsandbytes: QLoRA")
    flag(g, "--merge", action="store_true",
         help="also write the adapter merged into the fp32 base to OUTPUT_DIR/merged")
    t = p.add_argument_group("training")
    flag(t, "--batch_size", type=int, default=4, help="examples per step (4)")
    flag(t, "--gradient_accumulation_steps", type=int, default=1)
    flag(t, "--num_epochs", type=float, default=3, help="epochs (3)")
    flag(t, "--max_steps", type=int, help="stop after this many optimizer steps")
    t.add_argument("--lr", type=float, default=2e-4, help="learning rate (2e-4)")
    flag(t, "--max_length", type=int, default=256, help="tokens per example (256)")
    flag(t, "--warmup_steps", type=int, default=0)
    flag(t, "--no_gradient_checkpointing", action="store_true",
         help="keep activations (faster, more memory)")
    flag(t, "--chat_template", action="store_true",
         help="wrap prompts of prompt/completion pairs in the tokenizer's chat template")
    flag(t, "--max_examples", type=int, help="use at most this many training examples")
    flag(t, "--eval_examples", type=int, default=64,
         help="training examples whose loss is measured before and after (64; 0 skips)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    r = p.add_argument_group("TD reward")
    reward_flags(r)
    r.add_argument("--weighting", choices=("token", "sequence"), default="token",
                   help="token: w_t per token; sequence: one weight per example from its "
                   "mean delta (default token)")
    r.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of exp(delta / temperature) (1.0)")
    flag(r, "--w_max", type=float, default=5.0, help="weights are clipped at this (5.0)")
    r.add_argument("--baseline", choices=("batch", "none"), default="batch",
                   help="batch: the advantage is delta minus its batch mean (weights average "
                   "near 1); none: delta as is (default batch)")
    flag(r, "--reward_scale", type=float, default=1.0,
         help="0 = plain SFT, 1 = fully TD-weighted, between = a blend (1.0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tdreward.training.lora_setup import describe_examples
    from tdreward.training.lora_trainer import LoraTrainingConfig, run_lora

    targets = None
    if args.target_modules:
        targets = [n for item in args.target_modules for n in item.split(",") if n.strip()]
    cfg = LoraTrainingConfig(
        base_model=args.base_model, dataset=args.dataset, dataset_config=args.dataset_config,
        split=args.split, output_dir=args.output_dir, max_length=args.max_length,
        chat_template=args.chat_template, max_examples=args.max_examples, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
        use_8bit=args.use_8bit, use_4bit=args.use_4bit, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_epochs=args.num_epochs, max_steps=args.max_steps, lr=args.lr,
        warmup_steps=args.warmup_steps,
        gradient_checkpointing=not args.no_gradient_checkpointing, seed=args.seed,
        reward_model_path=args.reward_model_path, alpha=args.alpha, beta=args.beta,
        gamma=args.gamma, weighting=args.weighting, temperature=args.temperature,
        w_max=args.w_max, reward_scale=args.reward_scale, baseline=args.baseline, merge=args.merge,
        eval_examples=args.eval_examples, device=args.device,
    )
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
    print(f"adapter: {args.output_dir} (adapter_config.json, adapter_model.safetensors, "
          "tdreward_lora.json)")
    if m.get("merged_dir"):
        print(f"merged model: {m['merged_dir']}")
    return 0
