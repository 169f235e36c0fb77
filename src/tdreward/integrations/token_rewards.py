"""Token-level and step-level views of a TD reward, for trainers (no TRL import).

* `same_vocabulary`: whether two tokenizers map tokens to ids identically, so one model's
  token ids can be read by the other without re-tokenising.
* `step_groups` / `aggregate_steps`: split a completion's tokens into reasoning steps at a
  separator (e.g. "\\n\\n") and reduce each step's delta values: a process reward.
* `ReducedReward`: wraps a reward function that returns a list per completion (token or step
  rewards) into one float per completion, the only shape TRL 1.16's trainers accept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

from tdreward.errors import TDRewardError

STEP_AGGREGATIONS = ("mean", "sum")
REDUCTIONS = ("mean", "sum", "min", "last")


# --------------------------------------------------------------------------- tokenizers
def text_tokenizer(processing_class):
    """The text tokenizer of a transformers tokenizer or processor (multimodal processors
    hold theirs as `.tokenizer`)."""
    inner = getattr(processing_class, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "get_vocab") else processing_class


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the full token -> id map (added tokens included): equal fingerprints mean an
    id names the same token in both tokenizers. A class name or a model path would not do:
    a tokenizer with one added token has the same class and path but another map."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")
    return f"{len(vocab)}:{hashlib.sha256(blob).hexdigest()}"


def same_vocabulary(a, b) -> bool:
    """Whether token ids from tokenizer `a` mean the same tokens to tokenizer `b`."""
    a, b = text_tokenizer(a), text_tokenizer(b)
    if a is b:
        return True
    if len(a) != len(b):  # cheap first: most different tokenizers differ in size
        return False
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


# --------------------------------------------------------------------------- steps
def _decode(tokenizer, rows: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(rows, skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


def token_starts(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(text, starts): the decoded text of `ids` and the character offset where each token
    starts in it. From decoded prefixes, not per-token strings: a byte-level BPE token may
    hold half a UTF-8 character, and only prefixes decode to the text a reader sees. A
    prefix that ends inside a character may decode longer (a replacement character), so
    offsets are kept non-decreasing."""
    prefixes = _decode(tokenizer, [list(ids[:k]) for k in range(len(ids) + 1)])
    text = prefixes[-1]
    starts, hi = [], 0
    for p in prefixes[:-1]:
        hi = max(hi, min(len(p), len(text)))
        starts.append(hi)
    return text, starts


def step_groups(tokenizer, ids: Sequence[int], separator: str) -> list[list[int]]:
    """Indices of `ids` grouped into steps: a step ends after each occurrence of `separator`
    in the decoded text, and a token belongs to the step in which it starts (so a token such
    as ".\\n\\n" that holds the separator ends its step). Spans holding no token start are
    skipped: every returned step has at least one token."""
    if not separator:
        raise TDRewardError("step_separator must be a non-empty string")
    ids = list(ids)
    n = len(ids)
    text = _decode(tokenizer, [ids])[0]
    bounds, pos = [], text.find(separator)
    while pos >= 0:
        bounds.append(pos + len(separator))
        pos = text.find(separator, pos + len(separator))
    # first[j]: the first token that starts at or after boundary j. Decoding every prefix
    # costs O(n^2) tokens (0.3 s for 1,024 tokens); with few boundaries a binary search over
    # prefix lengths needs only about len(bounds) * log2(n) decodes.
    if len(bounds) * max(n, 2).bit_length() < n:
        cache = {0: 0, n: len(text)}

        def start(k: int) -> int:
            if k not in cache:
                cache[k] = min(len(_decode(tokenizer, [ids[:k]])[0]), len(text))
            return cache[k]

        first, lo = [], 0
        for b in bounds:
            hi = n
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (mid + 1, hi) if start(mid) < b else (lo, mid)
            first.append(lo)
    else:
        _, starts = token_starts(tokenizer, ids)
        first, k = [], 0
        for b in bounds:  # both ascending: one pass
            while k < n and starts[k] < b:
                k += 1
            first.append(k)
    groups: list[list[int]] = []
    step, j = -1, 0
    for k in range(n):
        while j < len(first) and first[j] <= k:  # boundaries at or before this token
            j += 1
        if j != step:
            groups.append([])
            step = j
        groups[-1].append(k)
    return groups


def aggregate_steps(values: Sequence[float], groups: Sequence[Sequence[int]],
                    how: str = "mean") -> list[float]:
    """One value per step: the mean or sum of `values` over each step's token indices."""
    if how not in STEP_AGGREGATIONS:
        raise TDRewardError(f"step_aggregation must be one of {', '.join(STEP_AGGREGATIONS)}, "
                            f"got {how!r}")
    out = []
    for g in groups:
        total = sum(values[k] for k in g)
        out.append(total / len(g) if how == "mean" else total)
    return out


def broadcast_steps(step_values: Sequence[float], groups: Sequence[Sequence[int]],
                    n_tokens: int) -> list[float]:
    """Each step's value on every one of its tokens (a piecewise-constant token reward)."""
    out = [0.0] * n_tokens
    for v, g in zip(step_values, groups, strict=True):
        for k in g:
            out[k] = v
    return out


# --------------------------------------------------------------------------- trainers
def reduce_values(values: Sequence[float], how: str, empty: float) -> float:
    """One float from a list of token or step rewards (`empty` for an empty list)."""
    if how not in REDUCTIONS:
        raise TDRewardError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {how!r}")
    if not values:
        return empty
    if how == "mean":
        return sum(values) / len(values)
    if how == "sum":
        return float(sum(values))
    return float(min(values)) if how == "min" else float(values[-1])


class ReducedReward:
    """One float per completion from a reward function that returns lists (token or step
    rewards): TRL 1.16's GRPOTrainer and RLOOTrainer accept only one reward per completion.

    `reduce`: "mean", "sum", "min" (the weakest step, a common process-reward rule) or
    "last". The lists the wrapped function returned in the latest call stay in
    `last_values`, for logging or a trainer of one's own that takes token-level rewards.
    """

    def __init__(self, reward_func: Callable[..., list], reduce: str = "mean",
                 name: str | None = None) -> None:
        reduce_values([], reduce, 0.0)  # checks `reduce` now, not at the first batch
        self.reward_func = reward_func
        self.reduce = reduce
        self.empty_reward = float(getattr(reward_func, "empty_reward", 0.0))
        self.__name__ = name or f"{getattr(reward_func, '__name__', 'reward')}_{reduce}"
        self.last_values: list[list[float]] = []

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        values = self.reward_func(prompts=prompts, completions=completions, **kwargs)
        if values and not isinstance(values[0], list | tuple):
            raise TDRewardError(f"{self.__name__}: the wrapped reward function returns one float "
                                "per completion already; use it without ReducedReward")
        self.last_values = [list(v) for v in values]
        return [reduce_values(v, self.reduce, self.empty_reward) for v in self.last_values]

    def __repr__(self) -> str:
        return f"ReducedReward({self.reward_func!r}, reduce={self.reduce!r})"
