"""Rollouts for PPO (docs/design.md §2.5): prompts -> batched generation -> per-token log-probs, KL and
TD-shaped rewards.

Shapes: B rows, Tq prompt tokens (left-padded, so every response starts at column Tq),
L response tokens (right-padded after the first EOS), V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tdreward.data.prompts import format_prompt
from tdreward.errors import TDRewardError
from tdreward.reward.lm import logits_fn, unwrap

log = logging.getLogger("tdreward")

ContextFactory = Callable[[], contextlib.AbstractContextManager]


# --------------------------------------------------------------------------- prompts
def encode_prompts(texts: Sequence[str], tokenizer, chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt; an instruct model's chat template wraps it as a user turn."""
    # PPO's default is "auto", not "chat": a base model without a template trains on raw
    # prompts rather than failing (--no_chat_template: always raw).
    mode = "auto" if chat_template else "raw"
    rows = [format_prompt(tokenizer, text, mode, tokenize=True) for text in texts]
    return [r for r in rows if r]


def truncate_left(rows: list[list[int]], max_length: int) -> list[list[int]]:
    """Keep the last `max_length` tokens of longer prompts (the end is what the reply follows)."""
    n_cut = sum(len(r) > max_length for r in rows)
    if n_cut:
        log.warning("%d prompt(s) longer than --max_length %d tokens were truncated from the "
                    "left (their last %d tokens are kept)", n_cut, max_length, max_length)
    return [r[-max_length:] for r in rows]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, T - len(r):] = 1
    return ids, mask


# --------------------------------------------------------------------------- prompt sets (PPOConfig)
def read_prompt_source(cfg) -> list[str]:
    """The prompt texts (--prompts) or corpus documents (--dataset); fails early when empty."""
    if cfg.prompts:
        from tdreward.data.prompts import load_prompts

        return [p.prompt for p in load_prompts(cfg.prompts)]
    from tdreward.data.corpus import load_corpus

    return load_corpus(cfg.dataset, cfg.dataset_config, split=cfg.split,
                       text_field=cfg.text_field)


def prompt_rows(cfg, texts: list[str], tokenizer) -> list[list[int]]:
    """Token rows of the training prompts: the prompts, or `prompt_tokens` windows of the
    corpus documents (at most `max_prompts`)."""
    if cfg.prompts:
        rows = encode_prompts(texts, tokenizer, cfg.chat_template)
    else:
        from tdreward.data.corpus import chunk_documents

        rows = []
        for doc in texts:
            ids = tokenizer(doc, add_special_tokens=True)["input_ids"]
            rows += [c for c in chunk_documents([ids], cfg.prompt_tokens, 0)
                     if len(c) >= min(8, cfg.prompt_tokens)]
            if len(rows) >= cfg.max_prompts:
                break
        rows = rows[: cfg.max_prompts]
    if not rows:
        raise TDRewardError(f"no usable prompts in {cfg.prompts or cfg.dataset}")
    return truncate_left(rows, cfg.max_length)


def epoch_order(n_prompts: int, n_needed: int, seed: int, epoch: int) -> list[int]:
    """Prompt indices for one epoch: reshuffled per epoch from (seed, epoch), so a resumed run
    sees the same order; repeated when an epoch needs more prompts than there are."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order: list[int] = []
    while len(order) < n_needed:
        order += torch.randperm(n_prompts, generator=g).tolist()
    return order[:n_needed]


# --------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    query: Tensor  # [B, Tq] left-padded prompts
    query_mask: Tensor
    response: Tensor  # [B, L], pad after the first EOS
    response_mask: Tensor  # [B, L]: 1 up to and including the first EOS

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    def responses(self) -> list[list[int]]:
        return [r[m.bool()].tolist() for r, m in zip(self.response, self.response_mask)]


def eos_ids(lm, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(unwrap(lm), "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return sorted(i for i in ids if i is not None)


def response_mask(response: Tensor, eos: Sequence[int]) -> Tensor:
    """1 up to and including each row's first EOS token, 0 after it."""
    is_eos = torch.isin(response, torch.as_tensor(list(eos), dtype=response.dtype,
                                                  device=response.device))
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


@torch.no_grad()
def generate(lm, tokenizer, rows: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float, device=None) -> Rollout:
    """Sample continuations of a batch of prompts from the full distribution (no top-k/top-p,
    so the sampling distribution is exactly the one PPO's log-probs describe)."""
    from transformers import GenerationConfig

    eos = eos_ids(lm, tokenizer)
    query, qmask = left_pad(rows, tokenizer.pad_token_id)
    if device is not None:
        query, qmask = query.to(device), qmask.to(device)
    gc = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                          max_new_tokens=max_new_tokens, eos_token_id=eos,
                          pad_token_id=tokenizer.pad_token_id)
    was_training = lm.training
    lm.eval()
    seq = lm.generate(input_ids=query, attention_mask=qmask, generation_config=gc)
    lm.train(was_training)
    response = seq[:, query.shape[1]:]
    rmask = response_mask(response, eos)
    response = torch.where(rmask.bool(), response, torch.full_like(response,
                                                                   tokenizer.pad_token_id))
    return Rollout(query, qmask, response, rmask)


def response_forward(lm, input_ids: Tensor, attention_mask: Tensor, n_response: int,
                     temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(logits [B, L, V] / temperature, final hidden states [B, L, D]) at the L positions that
    predict the response tokens. Position ids follow the attention mask, as in generation, so a
    left-padded prompt gives the same numbers as an unpadded one. Logits are built for the
    response positions only: the prompt's B x Tq x V never exists."""
    base = unwrap(lm)
    decoder = getattr(base, base.base_model_prefix)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    h = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                use_cache=False).last_hidden_state
    h = h[:, -n_response - 1 : -1]
    head, softcap = logits_fn(lm)
    logits = head(h).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits / temperature, h


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    k1 = log pi - log ref: unbiased, can be negative per token. k3 = (ref/pi - 1) - log(ref/pi):
    unbiased and never negative, lower variance (Schulman, "Approximating KL divergence")."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise TDRewardError(f"unknown KL estimator {estimator!r}; use k1 or k3")


# --------------------------------------------------------------------------- TD-shaped reward
def pack_right(rollout: Rollout, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt + response without the padding, right-padded (the critic's layout), and where each
    row's response starts."""
    rows, starts = [], []
    for q, qm, r, rm in zip(rollout.query, rollout.query_mask, rollout.response,
                            rollout.response_mask):
        qt = q[qm.bool()].tolist()
        starts.append(len(qt))
        rows.append(qt + r[rm.bool()].tolist())
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, torch.as_tensor(starts)


def align_to_response(per_pos: Tensor, starts: Tensor, rollout: Rollout) -> Tensor:
    """Per-prediction tensor [B, T-1] of the packed rows -> [B, L] over response tokens: the
    k-th response token is predicted at packed position start + k - 1."""
    L = rollout.response.shape[1]
    idx = (starts[:, None] + torch.arange(L)[None] - 1).clamp(0, per_pos.shape[1] - 1)
    return per_pos.gather(1, idx.to(per_pos.device)) * rollout.response_mask.to(per_pos.dtype)


class TDShapedReward:
    """Per-token reward of each response token: the critic's TD error delta_t (potential-based
    shaping of r_t, Ng et al. 1999). After scoring a batch the critic takes one TD(lambda) step
    on it, so V follows the policy's changing distribution (docs/design.md §2.5).

    `ref_context()` is entered around every use of the reference LM: with LoRA it disables the
    adapter, so the critic reads the frozen base model that the policy shares. With
    `eos_terminal` an EOS token ends the episode (V = 0 after it); otherwise nothing is terminal
    and a text's end bootstraps from V (see PPOConfig.eos_terminal for why that is the default).
    """

    def __init__(self, rm, ref_context: ContextFactory = contextlib.nullcontext,
                 lr: float = 1e-4, learn: bool = True, reduce_grads=None,
                 eos_terminal: bool = False):
        self.rm = rm
        self.ref_context = ref_context
        self.learn = learn
        self.eos_terminal = eos_terminal
        self.reduce_grads = reduce_grads  # averages the critic's gradients across processes
        params = [p for p in rm.critic.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr) if learn else None
        self.last_td_loss = math.nan

    def score(self, rollout: Rollout) -> tuple[Tensor, Tensor, object]:
        """(delta [B, L], r [B, L], LM features of the packed rows)."""
        ids, mask, starts = pack_right(rollout, self.rm.tokenizer.pad_token_id)
        dev = next(self.rm.critic.parameters()).device
        done = None if self.eos_terminal else torch.zeros_like(ids, dtype=torch.bool)
        with self.ref_context():
            out = self.rm.score_batch(ids.to(dev), mask.to(dev),
                                      done=None if done is None else done.to(dev))
        delta = align_to_response(out["delta"], starts, rollout)
        r = align_to_response(out["r"], starts, rollout)
        return delta, r, out["feats"]

    def __call__(self, rollout: Rollout) -> Tensor:
        delta, _, feats = self.score(rollout)
        if self.learn:
            self.td_step(feats)
        return delta

    def td_step(self, feats) -> float:
        """One TD(lambda) step on the critic's heads (the reference LM stays frozen)."""
        critic = self.rm.critic
        critic.train()
        loss = critic.td_lambda_loss(feats)
        self.optimizer.zero_grad()
        loss.backward()
        params = [p for p in critic.parameters() if p.grad is not None]
        if self.reduce_grads is not None:
            self.reduce_grads(params, loss)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        if finite:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.optimizer.step()
        else:
            log.warning("critic TD loss is not finite: the critic update was skipped")
        self.optimizer.zero_grad()
        critic.eval()
        self.last_td_loss = float(loss.detach())
        return self.last_td_loss


# --------------------------------------------------------------------------- advantages
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens [B, L]. The episode ends after a
    row's last valid token (EOS or the length limit): V = 0 beyond it."""
    L = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(L)):
        cont = mask[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        next_v = values[:, t + 1] * cont if t + 1 < L else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * cont * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def whiten(x: Tensor, mask: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """(x - mean) / std over the valid tokens of all processes (`reduce` sums across them)."""
    stats = reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean**2).clamp(min=0)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    m = mask.bool()
    y, v = returns[m], values[m]
    var_y = y.var() if y.numel() > 1 else torch.tensor(0.0)
    return float(1 - (y - v).var() / var_y) if var_y > 0 else math.nan


# --------------------------------------------------------------------------- evaluation
def repetition_rate(tokens: Sequence[int], n: int = 3) -> float:
    """Share of the n-grams of a text that repeat an earlier n-gram of the same text."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0
