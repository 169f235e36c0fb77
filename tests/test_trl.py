"""The TD reward as a TRL reward function: correct per completion, batched; the policy's
completion ids read without re-tokenising; chat-templated conversations; token- and
step-level rewards; one real GRPO step per output mode on a tiny model (TRL is the `trl`
extra: pip install -e '.[trl]')."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from conftest import make_tiny_lm
from tdreward import TDRewardModel
from tdreward.data.prompts import format_prompt
from tdreward.errors import TDRewardError
from tdreward.integrations.token_rewards import ReducedReward, step_groups
from tdreward.integrations.trl import TDRewardFunction

PROMPTS = ["The rat pressed the lever and", "Dopamine neurons fire when",
           "A cue predicts reward, so", "Under uncertainty the animal"]


def _reward_fn(tokenizer, batch_size=8, **kwargs) -> TDRewardFunction:
    lm = make_tiny_lm(len(tokenizer), seed=5)
    lm.config.pad_token_id = tokenizer.pad_token_id
    rm = TDRewardModel.from_lm(lm, tokenizer, "tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial critic heads, so V and delta vary
        for p in rm.critic.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return TDRewardFunction(rm, batch_size=batch_size, **kwargs)


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


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_completion_ids_are_read_when_the_policy_shares_the_vocabulary(tokenizer):
    completions = [" a drop of sugar water arrived.", " reward is better than predicted",
                   " the animal waits", " explores the maze"]
    # A copy is another object with the same token -> id map: recognised by its fingerprint.
    fn = _reward_fn(tokenizer, batch_size=3, policy_tokenizer=copy.deepcopy(tokenizer))
    text = fn(PROMPTS, completions)
    assert fn.last_source == "text"  # no ids given
    ids = [_ids(tokenizer, c) for c in completions]
    via_ids = fn(PROMPTS, completions, completion_ids=ids)
    assert fn.last_source == "completion_ids"
    assert via_ids == text  # round-tripping ids: the very same rows, the same rewards

    # Ids that do not round-trip: " sugar" spelled in two pieces decodes to the same text,
    # which re-tokenises to one token. The ids path scores the pieces the policy sampled.
    split = _ids(tokenizer, " a drop of sug") + _ids(tokenizer, "ar water arrived.")
    assert tokenizer.decode(split) == completions[0] and split != ids[0]
    got = fn(PROMPTS[:1], completions[:1], completion_ids=[split])[0]
    prompt = fn.reward_model.encode(PROMPTS[:1])[0]
    trace = fn.reward_model.score([prompt + split])[0]  # the reward model's own token-row path
    expected = sum(trace.delta[len(prompt) - 1:]) / len(split)
    assert abs(got - expected) < 1e-5 and abs(got - text[0]) > 1e-4

    # Another vocabulary (one added token): the ids could mean other tokens, so the text.
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<td_step>"])
    fallback = _reward_fn(tokenizer, policy_tokenizer=other)
    assert fallback(PROMPTS[:1], completions[:1], completion_ids=[split])[0] == text[0]
    assert fallback.last_source == "text" and not fallback.shares_vocabulary(other)
    # Without a policy tokenizer (and no trainer to ask) the ids cannot be checked: the text.
    plain = _reward_fn(tokenizer)
    assert plain(PROMPTS[:1], completions[:1], completion_ids=[split])[0] == text[0]
    assert plain.last_source == "text"


def test_conversational_completions_are_read_in_the_chat_template(tokenizer):
    fn = _reward_fn(tokenizer, per_token=True, policy_tokenizer=tokenizer)
    prompt = [[{"role": "user", "content": PROMPTS[0]}]]
    answer = " a drop of sugar water arrived."
    completion = [[{"role": "assistant", "content": answer}]]
    values = fn(prompt, completion)[0]
    # The assistant turn as the template writes it, up to its end-of-turn (EOS) token: the
    # template's trailing newline is never generated, so it is not read.
    pid = format_prompt(tokenizer, prompt[0], "chat", tokenize=True)
    full = _ids(tokenizer, tokenizer.apply_chat_template(prompt[0] + completion[0],
                                                         tokenize=False))
    cid = full[len(pid): full.index(tokenizer.eos_token_id, len(pid)) + 1]
    assert tokenizer.decode(cid) == answer + tokenizer.eos_token and len(values) == len(cid)
    # What the policy generated (its answer, then EOS), read as ids: the same values.
    ids = fn(prompt, completion, completion_ids=[_ids(tokenizer, answer) + [cid[-1]]])[0]
    torch.testing.assert_close(torch.tensor(ids), torch.tensor(values), rtol=1e-5, atol=1e-5)
    # The EOS is scored as a token but is not terminal by default: no V-sized jump there.
    assert abs(values[-1]) < 20
    terminal = _reward_fn(tokenizer, per_token=True, eos_terminal=True)(prompt, completion)[0]
    assert abs(terminal[-1]) > 10 * abs(values[-1]) and terminal[:-1] == values[:-1]


def test_token_and_step_rewards(tokenizer):
    text = " The cue lit up.\n\nThe rat pressed the lever.\n\nSugar came"
    cid = _ids(tokenizer, text)
    scalar = _reward_fn(tokenizer)(PROMPTS[:2], [text, ""])
    tokens = _reward_fn(tokenizer, per_token=True)(PROMPTS[:2], [text, ""])
    assert len(tokens[0]) == len(cid) and tokens[1] == []  # one delta per completion token
    assert abs(sum(tokens[0]) / len(cid) - scalar[0]) < 1e-6 and scalar[1] == 0.0

    groups = step_groups(tokenizer, cid, "\n\n")
    pieces = ["".join(tokenizer.decode([cid[k]]) for k in g) for g in groups]
    assert pieces == [" The cue lit up.\n\n", "The rat pressed the lever.\n\n", "Sugar came"]
    kw = {"step_separator": "\n\n"}
    mean = _reward_fn(tokenizer, **kw)(PROMPTS[:2], [text, ""])
    total = _reward_fn(tokenizer, step_aggregation="sum", **kw)(PROMPTS[:2], [text, ""])
    for g, m, s in zip(groups, mean[0], total[0], strict=True):
        step = [tokens[0][k] for k in g]
        assert abs(m - sum(step) / len(step)) < 1e-6 and abs(s - sum(step)) < 1e-6
    assert mean[1] == [] and total[1] == []
    # per_token with steps: each step's value on each of its tokens (piecewise constant), so
    # with "mean" the token values add up to the same total as the plain per-token deltas.
    spread = _reward_fn(tokenizer, per_token=True, **kw)(PROMPTS[:1], [text])[0]
    assert spread == [m for g, m in zip(groups, mean[0], strict=True) for _ in g]
    assert abs(sum(spread) - sum(tokens[0])) < 1e-5
    # A wrapper turns lists into the one float per completion TRL's trainers take.
    reduced = ReducedReward(_reward_fn(tokenizer, per_token=True))(PROMPTS[:2], [text, ""])
    assert abs(reduced[0] - scalar[0]) < 1e-6 and reduced[1] == 0.0
    with pytest.raises(TDRewardError, match="step_aggregation"):
        _reward_fn(tokenizer, step_aggregation="max", **kw)
    with pytest.raises(TDRewardError, match="reduce"):
        ReducedReward(_reward_fn(tokenizer), reduce="median")


@pytest.mark.parametrize("mode", ["mean", "per_token", "steps"])
def test_one_grpo_step_with_the_td_reward(tokenizer, tmp_path, mode):
    from trl import GRPOConfig, GRPOTrainer

    calls = []
    rm = _reward_fn(tokenizer).reward_model
    if mode == "mean":  # the default: one float per completion, GRPO's own shape
        class Recording(TDRewardFunction):  # the real function, noting what GRPO hands it
            def __call__(self, prompts, completions, **kw):
                out = super().__call__(prompts, completions, **kw)
                calls.append((list(completions), kw["completion_ids"], out, None))
                return out

        fn, inner = Recording(rm), None
    else:  # token or step lists, reduced to one float by ReducedReward
        class RecordingReduced(ReducedReward):
            def __call__(self, prompts, completions, **kw):
                out = super().__call__(prompts, completions, **kw)
                calls.append((list(completions), kw["completion_ids"], out, self.last_values))
                return out

        kwargs = {"per_token": True} if mode == "per_token" else {"step_separator": " "}
        inner = TDRewardFunction(rm, **kwargs)
        fn = RecordingReduced(inner, reduce="mean" if mode == "per_token" else "min",
                              name="td_reward")
    # The per-token run uses a conversational dataset: TRL generates in the chat template
    # and hands over lists of messages.
    prompts = ([[{"role": "user", "content": p}] for p in PROMPTS] if mode == "per_token"
               else PROMPTS)
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
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1
    assert calls, "GRPO never called the TD reward"
    completions, ids, rewards, lists = calls[0]
    assert len(completions) == len(rewards) == 4 and len(set(rewards)) > 1
    # The trainer's tokenizer is the reference's: the policy's ids were read as they are.
    assert (inner or fn).last_source == "completion_ids"
    if mode == "per_token":
        assert isinstance(completions[0], list)  # conversational: lists of messages
        assert [len(v) for v in lists] == [len(i) for i in ids]  # one value per policy token
        for v, r in zip(lists, rewards, strict=True):
            assert abs(sum(v) / len(v) - r) < 1e-6
    elif mode == "steps":
        for v, r, i in zip(lists, rewards, ids, strict=True):
            assert 1 <= len(v) <= len(i) and abs(min(v) - r) < 1e-6
    logged = [h for h in trainer.state.log_history if "rewards/td_reward/mean" in h]
    assert logged and abs(logged[0]["rewards/td_reward/mean"] - sum(rewards) / 4) < 1e-4
    changed = sum(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert changed > 0  # the step updated the policy
