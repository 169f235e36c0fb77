"""The TD reward as a TRL reward function: correct per completion, batched, and one real GRPO
step on a tiny model (TRL is the `trl` extra: pip install -e '.[trl]')."""

from __future__ import annotations

import torch
from datasets import Dataset

from conftest import make_tiny_lm
from tdreward import TDRewardModel
from tdreward.integrations.trl import TDRewardFunction

PROMPTS = ["The rat pressed the lever and", "Dopamine neurons fire when",
           "A cue predicts reward, so", "Under uncertainty the animal"]


def _reward_fn(tokenizer, batch_size=8) -> TDRewardFunction:
    lm = make_tiny_lm(len(tokenizer), seed=5)
    lm.config.pad_token_id = tokenizer.pad_token_id
    rm = TDRewardModel.from_lm(lm, tokenizer, "tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial critic heads, so V and delta vary
        for p in rm.critic.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return TDRewardFunction(rm, batch_size=batch_size)


def test_td_reward_function_matches_single_text_scoring(tokenizer):
    fn = _reward_fn(tokenizer, batch_size=3)
    completions = [" a drop of sugar water arrived.", " reward is better than predicted",
                   " the animal waits", " explores the maze"]
    rewards = fn(prompts=PROMPTS, completions=completions, completion_ids=None, trainer_state=None)
    assert fn.__name__ == "td_reward" and len(rewards) == 4
    assert all(isinstance(r, float) for r in rewards)
    # Batched and padded == one at a time == the reward model's own single-text path.
    one_by_one = [TDRewardFunction(fn.reward_model, batch_size=1)([p], [c])[0]
                  for p, c in zip(PROMPTS, completions)]
    single = [fn.reward_model.compute_td_reward(p, c) for p, c in zip(PROMPTS, completions)]
    for other in (one_by_one, single):  # equal up to float32 rounding of padded batches
        torch.testing.assert_close(torch.tensor(rewards), torch.tensor(other),
                                   rtol=1e-5, atol=1e-5)
    # The reward depends on the completion, not only on the prompt.
    other = fn(prompts=PROMPTS[:1], completions=[" a drop of salty water arrived."])[0]
    assert abs(other - rewards[0]) > 1e-4
    # Conversational data (lists of messages) and an empty completion.
    conv = fn(prompts=[[{"role": "user", "content": PROMPTS[0]}]],
              completions=[[{"role": "assistant", "content": completions[0]}]])
    assert isinstance(conv[0], float) and conv[0] != 0.0
    assert fn(prompts=PROMPTS[:1], completions=[""]) == [0.0]


def test_one_grpo_step_with_the_td_reward(tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    calls = []

    class Recording(TDRewardFunction):  # the real function, noting what GRPO hands it
        def __call__(self, prompts, completions, **kw):
            out = super().__call__(prompts, completions, **kw)
            calls.append((list(completions), out))
            return out

    fn = Recording(_reward_fn(tokenizer).reward_model)
    policy = make_tiny_lm(len(tokenizer), seed=7)
    policy.config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=1, learning_rate=1e-2, use_cpu=True, bf16=False,
        report_to="none", logging_steps=1, save_strategy="no", beta=0.0, seed=0,
        generation_kwargs={"do_sample": True, "top_k": 0},
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[fn], args=args,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                          processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1
    assert calls, "GRPO never called the TD reward"
    completions, rewards = calls[0]
    assert len(completions) == len(rewards) == 4 and len(set(rewards)) > 1
    logged = [h for h in trainer.state.log_history if "rewards/td_reward/mean" in h]
    assert logged and abs(logged[0]["rewards/td_reward/mean"] - sum(rewards) / 4) < 1e-4
    changed = sum(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert changed > 0  # the step updated the policy
