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

Which tokens the reference reads (docs/trl.md):
* When the policy's tokenizer has the reference's token -> id map, the policy's own
  `completion_ids` (EOS included when generated) follow the prompt's tokens: no
  re-tokenisation, so the reference scores exactly what the policy sampled. Otherwise the
  completion's text is tokenised (a text the policy spelled with unusual token splits is then
  read in the reference's own split).
* A conversational completion (a list of messages) is read in the chat template, up to and
  including its first EOS (the end-of-turn token the policy stops at).
Output: one float per completion (default); with `per_token` the list of delta values over
its tokens; with `step_separator` one value per reasoning step (`step_aggregation` "mean" or
"sum" of delta), or, with `per_token` as well, each step's value on every one of its tokens.
TRL 1.16's trainers accept one float per completion: wrap list outputs in `ReducedReward`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tdreward.data.prompts import format_prompt, has_chat_template
from tdreward.errors import TDRewardError
from tdreward.hardware import HardwareSettings
from tdreward.integrations.token_rewards import (
    STEP_AGGREGATIONS,
    ReducedReward,
    aggregate_steps,
    broadcast_steps,
    same_vocabulary,
    step_groups,
    text_tokenizer,
)
from tdreward.reward_model import TDRewardModel

Reward = float | list[float]


class TDRewardFunction:
    """Callable reward for TRL: `__call__(prompts, completions, **kwargs)`.

    Not a `torch.nn.Module` on purpose: TRL treats modules as sequence-classification reward
    models. `__name__` (default "td_reward") names the reward in TRL's logs.

    `use_completion_ids`: read TRL's `completion_ids` when the policy shares the reference's
    vocabulary (False: always the text). `policy_tokenizer`: the policy's tokenizer or
    processor; None: the `processing_class` of the trainer that calls (TRL hands reward
    functions its bound `log_metric`), and the text path when there is none.
    `per_token`, `step_separator`, `step_aggregation`: the output's shape (module docstring).
    `eos_terminal`: make the state after an EOS terminal (V = 0 there). Off by default: the
    policy's ids end with the EOS it stopped at, and a terminal state pays a TD error of the
    size of V (hundreds of nats, gamma 0.99) that would swamp the mean; the EOS token's own
    surprise counts either way.
    """

    def __init__(self, reward_model: TDRewardModel, batch_size: int = 8,
                 max_length: int | None = None, empty_reward: float = 0.0,
                 name: str = "td_reward", *, per_token: bool = False,
                 step_separator: str | None = None, step_aggregation: str = "mean",
                 use_completion_ids: bool = True, policy_tokenizer: object | None = None,
                 eos_terminal: bool = False) -> None:
        if batch_size < 1:
            raise TDRewardError(f"batch_size must be at least 1, got {batch_size}")
        if step_aggregation not in STEP_AGGREGATIONS:
            raise TDRewardError(f"step_aggregation must be one of "
                                f"{', '.join(STEP_AGGREGATIONS)}, got {step_aggregation!r}")
        if step_separator is not None and not step_separator:
            raise TDRewardError("step_separator must be a non-empty string (or None)")
        self.reward_model = reward_model
        self.batch_size = batch_size
        self.max_length = max_length
        self.empty_reward = empty_reward  # the reward of a completion with no token
        self.per_token = per_token
        self.step_separator = step_separator
        self.step_aggregation = step_aggregation
        self.use_completion_ids = use_completion_ids
        self.policy_tokenizer = policy_tokenizer
        self.eos_terminal = eos_terminal
        self.__name__ = name
        # id(tokenizer) -> (tokenizer, same vocabulary?): hashing a 50k-200k vocabulary per
        # batch would cost more than the check is worth; the tokenizer is held so its id is
        # not reused by another object.
        self._vocab_checks: dict[int, tuple[object, bool]] = {}
        self.last_source = ""  # "completion_ids" or "text": what the latest call read

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

    # ----------------------------------------------------------------- which tokens
    def shares_vocabulary(self, tokenizer: object) -> bool:
        """Whether `tokenizer`'s ids mean the reference's tokens (cached per tokenizer)."""
        hit = self._vocab_checks.get(id(tokenizer))
        if hit is None:
            hit = (tokenizer, same_vocabulary(tokenizer, self.reward_model.tokenizer))
            self._vocab_checks[id(tokenizer)] = hit
        return hit[1]

    def _policy_tokenizer(self, kwargs: dict) -> object | None:
        if self.policy_tokenizer is not None:
            return text_tokenizer(self.policy_tokenizer)
        # TRL (1.16) passes bound methods of the trainer as `log_metric` / `log_extra`; its
        # processing_class is the tokenizer the completion ids came from.
        for key in ("log_metric", "log_extra"):
            trainer = getattr(kwargs.get(key), "__self__", None)
            proc = getattr(trainer, "processing_class", None)
            if proc is not None:
                return text_tokenizer(proc)
        return None

    def _read_ids(self, completion_ids, n: int, kwargs: dict) -> bool:
        if not self.use_completion_ids or completion_ids is None or len(completion_ids) != n:
            return False
        tok = self._policy_tokenizer(kwargs)
        return tok is not None and self.shares_vocabulary(tok)

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

    def _chat_pair(self, prompt, completion: list, pid: list[int]) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of a conversation in the chat template: the template
        renders the assistant turn (its header is already in the prompt's generation prompt),
        and the completion stops after its first EOS, where the policy stops generating; what
        a template writes after that (a newline) is never sampled."""
        tok = self.reward_model.tokenizer
        head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tok.apply_chat_template(head + list(completion), tokenize=False)
        full = tok(text, add_special_tokens=False)["input_ids"]
        # Templates may render the earlier turns differently once an answer follows (e.g.
        # dropping a thinking block): the completion starts where the two first differ.
        k = 0
        while k < min(len(pid), len(full)) and pid[k] == full[k]:
            k += 1
        cid = full[k:]
        eos = tok.eos_token_id
        if eos is not None and eos in cid:
            cid = cid[: cid.index(eos) + 1]
        return full[:k], cid

    def _pair(self, prompt, completion, ids: Sequence[int] | None) -> tuple[list[int], list[int]]:
        pid = self._prompt_ids(prompt)
        tok = self.reward_model.tokenizer
        if ids is not None:
            cid = [int(t) for t in ids]
        elif isinstance(completion, str):
            cid = tok(completion, add_special_tokens=False)["input_ids"]
        elif has_chat_template(tok):
            pid, cid = self._chat_pair(prompt, completion, pid)
        else:  # no template: the contents, read raw
            cid = tok("".join(m.get("content") or "" for m in completion),
                      add_special_tokens=False)["input_ids"]
        if not pid and cid:  # nothing to predict the first token from: it becomes context
            pid, cid = cid[:1], cid[1:]
        return pid, cid

    # ----------------------------------------------------------------- scoring
    def token_deltas(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[list[float]]:
        """delta at each position that predicts a completion token, per (prompt ids,
        completion ids) pair: one value per completion token, in padded batches."""
        out: list[list[float]] = [[] for _ in pairs]
        todo = sorted((i for i, (_, c) in enumerate(pairs) if c),
                      key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        rm = self.reward_model
        for a in range(0, len(todo), self.batch_size):
            batch = todo[a: a + self.batch_size]
            ids, mask = rm.pad([pairs[i][0] + pairs[i][1] for i in batch])
            # None: score_batch's own rule (EOS terminal); zeros: nothing terminal.
            done = None if self.eos_terminal else torch.zeros_like(ids, dtype=torch.bool)
            with torch.no_grad():
                delta = rm.score_batch(ids, mask, done=done,
                                       max_length=self.max_length)["delta"].cpu()
            for j, i in enumerate(batch):
                p, c = pairs[i]
                # Position t predicts token t+1: the completion's first token at len(p)-1.
                out[i] = delta[j, len(p) - 1: len(p) + len(c) - 1].tolist()
        return out

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids=None,
                 **kwargs) -> list[Reward]:
        if len(prompts) != len(completions):
            raise TDRewardError(f"{len(prompts)} prompts but {len(completions)} completions")
        use_ids = self._read_ids(completion_ids, len(completions), kwargs)
        self.last_source = "completion_ids" if use_ids else "text"
        ids_list = completion_ids if use_ids else [None] * len(completions)
        pairs = [self._pair(p, c, i)
                 for p, c, i in zip(prompts, completions, ids_list, strict=True)]
        deltas = self.token_deltas(pairs)
        if self.step_separator is None:
            if self.per_token:
                return deltas
            return [sum(d) / len(d) if d else self.empty_reward for d in deltas]
        rewards: list[Reward] = []
        for (_, cid), d in zip(pairs, deltas, strict=True):
            groups = step_groups(self.reward_model.tokenizer, cid, self.step_separator) if cid \
                else []
            steps = aggregate_steps(d, groups, self.step_aggregation)
            rewards.append(broadcast_steps(steps, groups, len(d)) if self.per_token else steps)
        return rewards

    def __repr__(self) -> str:
        return (f"TDRewardFunction({self.reward_model.base_model!r}, "
                f"trained={self.reward_model.trained})")


__all__ = ["ReducedReward", "TDRewardFunction"]
