"""Does a TD-weighted LoRA run learn, and does it move the held-out TD reward?

    python benchmarks/lora_learning.py --reward_model_path CRITIC_DIR --output_dir /tmp/lora_bench

1. data/sample_training_data.jsonl is split (seeded) into training pairs and held-out pairs.
2. Before training, the base model (embedded SmolLM2 by default) is measured on held-out data:
   * the plain cross-entropy of the held-out reference completions;
   * the TD reward of those completions (mean delta over their tokens; reference LM = the model
     being measured, critic fixed) — what `tdreward score --model M` reports;
   * greedy generations for the held-out prompts plus prompts from data/eval_prompts.jsonl,
     scored by the fixed reward model (base LM + critic): the TD reward of the model's outputs.
3. `run_lora` trains an adapter on the training pairs (TD-weighted loss, the trained critic).
4. The same measurements with the adapter; paired differences with standard errors.
   --compare_sft also trains a plain-SFT adapter (reward_scale 0) with the same settings.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from tdreward.backends.hf import load_model
from tdreward.data import load_prompts
from tdreward.integrations.trl import TDRewardFunction
from tdreward.io import write_json
from tdreward.reward_model import TDRewardModel
from tdreward.reward_settings import RewardSettings
from tdreward.training.lora_setup import PadCollator, encode_pairs, format_prompt
from tdreward.training.lora_trainer import LoraTrainingConfig, run_lora

REPO = Path(__file__).resolve().parents[1]


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)
    return m, math.sqrt(var / len(xs))


@torch.no_grad()
def heldout_ce(model, tok, pairs) -> float:
    """Mean cross-entropy per completion token (nats) of the held-out reference completions."""
    batch = PadCollator(tok.pad_token_id)(encode_pairs(tok, pairs, 256))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100))


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations (the training format: prompt + newline), cut at EOS."""
    tok.padding_side = "left"
    enc = tok([format_prompt(tok, p, False) for p in prompts], return_tensors="pt",
              padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tok.padding_side = "right"
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for row in out]


def measure(name, model, tok, critic_path, spec, held, gen_prompts, fixed_rm, max_new):
    """Every held-out figure for one model (base or adapted)."""
    t0 = time.perf_counter()
    own = TDRewardFunction(TDRewardModel.from_pretrained(critic_path, base_model=spec, lm=model,
                                                         tokenizer=tok))
    fixed = TDRewardFunction(fixed_rm)
    prompts = [format_prompt(tok, e.prompt, False) for e in held]
    gens = generate(model, tok, gen_prompts, max_new)
    gen_prompts_fmt = [format_prompt(tok, p, False) for p in gen_prompts]
    res = {
        "heldout_ce": heldout_ce(model, tok, held),
        "heldout_td_own": own(prompts, [e.completion for e in held]),
        "gen_td_fixed": fixed(gen_prompts_fmt, gens),
        "gen_len_tokens": [len(tok(g, add_special_tokens=False)["input_ids"]) for g in gens],
        "generations": gens,
    }
    print(f"[{name}] measured in {time.perf_counter() - t0:.0f} s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="TD-weighted LoRA: training loss and held-out "
                                 "TD reward before vs after")
    ap.add_argument("--base_model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--reward_model_path", required=True)
    ap.add_argument("--data", default=str(REPO / "data" / "sample_training_data.jsonl"))
    ap.add_argument("--eval_prompts", default=str(REPO / "data" / "eval_prompts.jsonl"))
    ap.add_argument("--n_eval_prompts", type=int, default=12)
    ap.add_argument("--held_out", type=int, default=12)
    ap.add_argument("--output_dir", default="/tmp/lora_bench")
    ap.add_argument("--num_epochs", type=float, default=3)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--w_max", type=float, default=5.0)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--compare_sft", action="store_true", help="also train plain SFT")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    pairs = [e for e in load_prompts(args.data) if e.completion]
    random.Random(args.seed).shuffle(pairs)
    held, train = pairs[: args.held_out], pairs[args.held_out:]
    train_file = out / "train.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion})
                                  + "\n" for e in train))
    gen_prompts = [e.prompt for e in held] + [
        e.prompt for e in load_prompts(args.eval_prompts)[: args.n_eval_prompts]]

    base, tok = load_model(args.base_model)
    fixed_rm = TDRewardModel.from_pretrained(args.reward_model_path, base_model=args.base_model,
                                             lm=base, tokenizer=tok)
    results = {"before": measure("base", base, tok, args.reward_model_path, args.base_model,
                                 held, gen_prompts, fixed_rm, args.max_new_tokens)}
    runs = [("td", 1.0)] + ([("sft", 0.0)] if args.compare_sft else [])
    for name, scale in runs:
        cfg = LoraTrainingConfig(
            base_model=args.base_model, dataset=str(train_file), output_dir=str(out / name),
            reward=RewardSettings(reward_model_path=args.reward_model_path),
            epochs=args.num_epochs,
            batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
            w_max=args.w_max, reward_scale=scale, seed=args.seed, eval_examples=len(train))
        m = run_lora(cfg)
        from peft import PeftModel

        fresh, _ = load_model(args.base_model)
        adapted = PeftModel.from_pretrained(fresh, str(out / name)).eval()
        results[name] = {"train": {k: m[k] for k in ("train_wall_s", "global_steps", "before",
                                                       "after")},
                         "after": measure(name, adapted, tok, args.reward_model_path,
                                          args.base_model, held, gen_prompts, fixed_rm,
                                          args.max_new_tokens)}
    results["wall_s"] = time.perf_counter() - start
    results["setup"] = {**vars(args), "n_train": len(train), "n_held_out": len(held),
                        "n_gen_prompts": len(gen_prompts)}
    write_json(out / "results.json", results)
    report(results)


def report(results: dict) -> None:
    b = results["before"]
    print(f"\nsetup: {results['setup']['n_train']} training pairs, "
          f"{results['setup']['n_held_out']} held-out pairs, "
          f"{results['setup']['n_gen_prompts']} generation prompts")
    for name in ("td", "sft"):
        if name not in results:
            continue
        r, t = results[name]["after"], results[name]["train"]
        label = "TD-weighted LoRA" if name == "td" else "plain SFT LoRA (control)"
        print(f"\n== {label}: {t['global_steps']} steps, training wall {t['train_wall_s']:.0f} s")
        tb, ta = t["before"], t["after"]
        print(f"training-set plain CE     {tb['sft_loss']:.4f} -> {ta['sft_loss']:.4f}")
        if "td_weighted_loss" in tb:
            print(f"training-set TD-weighted  {tb['td_weighted_loss']:.4f} -> "
                  f"{ta['td_weighted_loss']:.4f}")
        print(f"held-out CE (nats/token)  {b['heldout_ce']:.4f} -> {r['heldout_ce']:.4f}")
        for key, what in (("heldout_td_own", "held-out completions, TD reward (own LM)"),
                          ("gen_td_fixed", "greedy generations, TD reward (base LM)")):
            mb, sb = mean_se(b[key])
            ma, sa = mean_se(r[key])
            md, sd = mean_se([y - x for x, y in zip(b[key], r[key])])
            print(f"{what:45s} {mb:+.4f} ± {sb:.4f} -> {ma:+.4f} ± {sa:.4f}   "
                  f"paired diff {md:+.4f} ± {sd:.4f} (n={len(b[key])})")
        print(f"mean generation length    {sum(b['gen_len_tokens']) / len(b['gen_len_tokens']):.1f}"
              f" -> {sum(r['gen_len_tokens']) / len(r['gen_len_tokens']):.1f} tokens")
    print(f"\ntotal wall time {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
