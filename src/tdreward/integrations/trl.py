"""The TD reward as a TRL reward function (`reward_funcs=` of GRPOTrainer / RLOOTrainer).

    from trl import GRPOConfig, GRPOTrainer
    from tdreward.integrations.trl import TDRewardFunction

    td = TDRewardFunction.from_pretrained("critic_dir")        # the critic is loaded once
    trainer = GRPOTrainer(model=..., reward_funcs=[td], args=GRPOConfig(...), train_dataset=...)

TRL calls `td(prompts=..., completions=..., completion_ids=..., **columns)` once per batch of
generations; each completion's reward is its TD reward: the mean TD error delta_t over the
positions that predict the completion's tokens, read by the frozen reference LM + critic (not
the policy). Completions are scored together in padded batches. Standard (text) and
conversational (lists of messages) datasets both work. This module does not import TRL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tdreward.data.prompts import format_prompt, has_chat_template
from tdreward.errors import TDRewardError
from tdreward.hardware import HardwareSettings
from tdreward.reward_model import TDRewardModel


class TDRewardFunction:
    """Callable reward for TRL: `__call__(prompts, completions, **kwargs) -> list[float]`.

    Not a `torch.nn.Module` on purpose: TRL treats modules as sequence-classification reward
    models. `__name__` (default "td_reward") names the reward in TRL's logs.
    """

    def __init__(self, reward_model: TDRewardModel, batch_size: int = 8,
                 max_length: int | None = None, empty_reward: float = 0.0,
                 name: str = "td_reward") -> None:
        if batch_size < 1:
            raise TDRewardError(f"batch_size must be at least 1, got {batch_size}")
        self.reward_model = reward_model
        self.batch_size = batch_size
        self.max_length = max_length
        self.empty_reward = empty_reward  # the reward of a completion with no token
        self.__name__ = name

    @classmethod
    def from_pretrained(cls, reward_model_path: str | None = None, base_model: str | None = None,
                        hardware: HardwareSettings | None = None, **kwargs) -> TDRewardFunction:
        """Load the reward model once: a trained critic (its own reference LM unless
        `base_model` is given) or, without a path, an untrained critic on `base_model`.
        `hardware`: where and in what dtype the reference LM loads (None: float32 on the
        CPU)."""
        from tdreward.reward_model import load_reward_model
        from tdreward.reward_settings import RewardSettings
        from tdreward.specs import DEFAULT_MODEL

        settings = RewardSettings(reward_model_path=reward_model_path)
        meta = settings.check_fits(base_model)  # before any model loads
        spec = base_model or (meta or {}).get("base_model") or DEFAULT_MODEL
        return cls(load_reward_model(spec, settings, hardware=hardware), **kwargs)

    # ----------------------------------------------------------------- text handling
    def _prompt_ids(self, prompt) -> list[int]:
        tok = self.reward_model.tokenizer
        # TRL's own rule: a text prompt (standard format) is never wrapped: read raw, after
        # the prefix token, as `tdreward score` reads a text. A conversation (a list of
        # messages) is mode "auto": in the chat template when the tokenizer has one, else its
        # contents joined by newlines, read raw like a text.
        if isinstance(prompt, str):
            return self.reward_model.encode([prompt])[0]
        if has_chat_template(tok):
            return format_prompt(tok, prompt, "chat", tokenize=True)
        return self.reward_model.encode([format_prompt(tok, prompt, "raw")])[0]

    def _completion_ids(self, completion) -> list[int]:
        text = completion if isinstance(completion, str) else "".join(
            m.get("content") or "" for m in completion)
        return self.reward_model.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ----------------------------------------------------------------- scoring
    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise TDRewardError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows: list[list[int]] = []
        starts: list[int] = []
        for p, c in zip(prompts, completions, strict=True):
            pid, cid = self._prompt_ids(p), self._completion_ids(c)
            rows.append(pid + cid)
            starts.append(len(pid))
        rewards = [self.empty_reward] * len(rows)
        todo = sorted((i for i in range(len(rows)) if len(rows[i]) > max(starts[i], 1)),
                      key=lambda i: len(rows[i]))
        rm = self.reward_model
        device = next(rm.critic.parameters()).device
        for a in range(0, len(todo), self.batch_size):
            batch = todo[a: a + self.batch_size]
            ids, mask = rm.pad([rows[i] for i in batch])
            with torch.no_grad():
                delta = rm.score_batch(ids.to(device), mask.to(device),
                                       max_length=self.max_length)["delta"]
            for j, i in enumerate(batch):
                # Position t predicts token t+1: the completion's first token is predicted at
                # start-1 (or at 0 when the prompt is empty and the first token is not scored).
                lo = max(starts[i] - 1, 0)
                rewards[i] = float(delta[j, lo: len(rows[i]) - 1].mean())
        return rewards

    def __repr__(self) -> str:
        return (f"TDRewardFunction({self.reward_model.base_model!r}, "
                f"trained={self.reward_model.trained})")
