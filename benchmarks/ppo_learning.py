"""Does PPO with the TD reward learn? (issue #6, item 5)

The embedded SmolLM2-135M-Instruct with a LoRA adapter, on CPU. PPO trains on the prompts of
data/sample_training_data.jsonl; the evaluation uses data/eval_prompts.jsonl, whose prompts are
never trained on (checked below). Before and after training, on the held-out prompts:

* mean TD reward: delta_t per response token under the *original* critic (the run's own critic
  keeps learning online, so it is not used to judge the run), averaged per response;
* KL(policy || reference) per response (k1 on the policy's samples; 0 before training);
* repetition rate: share of a response's token 3-grams that repeat an earlier one;
* response length.

Sampling is seeded, so both evaluations use the same random numbers; differences are paired by
prompt, with their standard error.

    .venv/bin/python benchmarks/ppo_learning.py --reward_model_path /work/critic_smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward_model_path", help="trained critic (default: untrained heads)")
    p.add_argument("--base_model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--train_prompts", default=str(REPO / "data" / "sample_training_data.jsonl"))
    p.add_argument("--eval_prompts", default=str(REPO / "data" / "eval_prompts.jsonl"))
    p.add_argument("--output_dir", default="/tmp/tdreward_ppo_learning")
    p.add_argument("--steps", type=int, default=12, help="PPO steps")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--mini_batch_size", type=int, default=4)
    p.add_argument("--ppo_epochs", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--kl_coef", type=float, default=0.05)
    p.add_argument("--alpha", type=float, help="override the critic's alpha")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--eos_terminal", action="store_true", help="EOS ends the critic's episode")
    p.add_argument("--eval_samples", type=int, default=2, help="responses per held-out prompt")
    p.add_argument("--eval_batch", type=int, default=16)
    p.add_argument("--max_eval_prompts", type=int, help="evaluate on the first N only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


def per_prompt(texts: list[dict], key: str, k: int) -> list[float]:
    """Average the k samples of each prompt (they are consecutive)."""
    return [sum(t[key] for t in texts[i : i + k]) / k for i in range(0, len(texts), k)]


@torch.no_grad()
def evaluate_policy(policy_lm, ref_lm, tokenizer, reward,
                    rows: list[list[int]], batch_size: int = 8, max_new_tokens: int = 48,
                    temperature: float = 1.0, seed: int = 0, samples_per_prompt: int = 1,
                    policy_context=contextlib.nullcontext,
                    ref_context=contextlib.nullcontext) -> dict:
    """Generate from the policy on held-out prompts and measure: mean TD reward (delta) and mean
    r of the response tokens, KL(policy || reference) (k1 summed per response and per token),
    repetition rate (share of repeated 3-grams) and length. Sampling is seeded, so two policies
    are compared on the same random numbers. `reward` is a TDShapedReward (not learning)."""
    from tdreward.training.rollout import (
        generate,
        repetition_rate,
        response_forward,
        token_logprobs,
    )

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    per_text: list[dict] = []
    todo = [r for r in rows for _ in range(samples_per_prompt)]
    try:
        for a in range(0, len(todo), batch_size):
            batch = todo[a : a + batch_size]
            with policy_context():
                ro = generate(policy_lm, tokenizer, batch, max_new_tokens, temperature)
                logits, _ = response_forward(policy_lm, ro.input_ids, ro.attention_mask,
                                             ro.response.shape[1], temperature)
                logp = token_logprobs(logits, ro.response)
            with ref_context():
                ref_logits, _ = response_forward(ref_lm, ro.input_ids, ro.attention_mask,
                                                 ro.response.shape[1], temperature)
                ref_logp = token_logprobs(ref_logits, ro.response)
            delta, r, _ = reward.score(ro)
            m = ro.response_mask.float()
            kl = (logp - ref_logp) * m
            for i, toks in enumerate(ro.responses()):
                n = float(m[i].sum())
                per_text.append({
                    "td_reward": float(delta[i].sum() / n), "mean_r": float(r[i].sum() / n),
                    "kl": float(kl[i].sum()), "kl_per_token": float(kl[i].sum() / n),
                    "repetition_rate": repetition_rate(toks), "length": n,
                    "text": tokenizer.decode(toks, skip_special_tokens=True),
                })
    finally:
        torch.random.set_rng_state(gen_state)
    keys = ("td_reward", "mean_r", "kl", "kl_per_token", "repetition_rate", "length")
    summary = {k: sum(t[k] for t in per_text) / len(per_text) for k in keys}
    summary["n_texts"] = len(per_text)
    return {"summary": summary, "texts": per_text}


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    from tdreward.backends.hf import load_model
    from tdreward.data.prompts import load_prompts
    from tdreward.reward_model import TDRewardModel
    from tdreward.reward_settings import RewardSettings
    from tdreward.training.ppo_trainer import PPOConfig, train_ppo
    from tdreward.training.rollout import TDShapedReward, encode_prompts

    train_p = [p.prompt for p in load_prompts(args.train_prompts)]
    eval_p = [p.prompt for p in load_prompts(args.eval_prompts)][: args.max_eval_prompts]
    overlap = {p.strip().lower() for p in train_p} & {p.strip().lower() for p in eval_p}
    assert not overlap, f"evaluation prompts also in the training set: {sorted(overlap)[:3]}"
    lm, tok = load_model(args.base_model)
    rows = encode_prompts(eval_p, tok)

    def eval_reward(context=None) -> TDShapedReward:
        """The original critic, frozen: the same yardstick before and after training."""
        if args.reward_model_path:
            rm = TDRewardModel.from_pretrained(args.reward_model_path, base_model=args.base_model,
                                               lm=lm, tokenizer=tok)
        else:
            rm = TDRewardModel.from_lm(lm, tok, args.base_model)
        if args.alpha is not None:
            from tdreward.reward.config import RewardConfig

            rm.critic.config = RewardConfig.from_dict(rm.config.to_dict() | {"alpha": args.alpha})
        return TDShapedReward(rm, context or contextlib.nullcontext, learn=False,
                              eos_terminal=args.eos_terminal)

    ev = {"batch_size": args.eval_batch, "max_new_tokens": args.max_new_tokens,
          "seed": args.seed + 1, "samples_per_prompt": args.eval_samples}
    t0 = time.perf_counter()
    before = evaluate_policy(lm, lm, tok, eval_reward(), rows, **ev)
    t_eval = time.perf_counter() - t0

    out = Path(args.output_dir)
    reward = RewardSettings(reward_model_path=args.reward_model_path, alpha=args.alpha)
    cfg = PPOConfig(base_model=args.base_model, reward=reward, prompts=args.train_prompts,
                    output_dir=str(out), epochs=1,
                    steps_per_epoch=args.steps, batch_size=args.batch_size,
                    mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
                    max_new_tokens=args.max_new_tokens, lr=args.lr, kl_coef=args.kl_coef,
                    eos_terminal=args.eos_terminal, use_lora=True,
                    lora_r=args.lora_r, lora_alpha=2 * args.lora_r, seed=args.seed,
                    progress=False)
    t0 = time.perf_counter()
    res = train_ppo(cfg, lm=lm, tokenizer=tok)
    t_train = time.perf_counter() - t0

    policy = res.model.policy
    after = evaluate_policy(policy, policy, tok, eval_reward(res.ref_context), rows,
                            ref_context=res.ref_context, **ev)

    k = args.eval_samples
    report = {"args": vars(args), "train_seconds": t_train, "eval_seconds_each": t_eval,
              "n_train_prompts": len(train_p), "n_eval_prompts": len(eval_p), "figures": {}}
    print(f"PPO: {args.steps} steps x {args.batch_size} rollouts in {t_train / 60:.1f} min "
          f"(+ {t_eval / 60:.1f} min per evaluation); {len(eval_p)} held-out prompts x {k}")
    print(f"{'metric':<18}{'before':>18}{'after':>18}{'after - before':>22}")
    for key in ("td_reward", "mean_r", "kl", "repetition_rate", "length"):
        b, a = per_prompt(before["texts"], key, k), per_prompt(after["texts"], key, k)
        (mb, sb), (ma, sa) = mean_se(b), mean_se(a)
        md, sd = mean_se([y - x for x, y in zip(b, a)])
        report["figures"][key] = {"before": mb, "before_se": sb, "after": ma, "after_se": sa,
                                  "diff": md, "diff_se": sd}
        print(f"{key:<18}{mb:>10.4f} ± {sb:<6.4f}{ma:>10.4f} ± {sa:<6.4f}{md:>+12.4f} ± {sd:.4f}")
    m = res.metrics
    third = max(1, len(m) // 3)
    first = sum(r["reward"] for r in m[:third]) / third
    last = sum(r["reward"] for r in m[-third:]) / third
    print(f"training rollouts: mean TD reward {first:.4f} (first {third} steps) -> {last:.4f} "
          f"(last {third}); final KL/token {m[-1]['kl']:.4f}")
    report["training"] = {"reward_first_third": first, "reward_last_third": last,
                          "metrics": m}
    report["samples"] = {"before": before["texts"][:6], "after": after["texts"][:6]}
    (out / "learning_report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'learning_report.json'}")


if __name__ == "__main__":
    main()
