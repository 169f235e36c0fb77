"""One forward pass of a reference LM -> the features the critic needs (pure torch, no I/O).

The decoder runs once over the batch; log p(next token) and entropy come from its final hidden
states a tile of logits at a time, so the full B x T x V logits never exist. Texts longer
than the context window are read with sliding windows: each token is scored exactly once, with
as much left context as the window allows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tdreward.data.corpus import chunk_token_windows
from tdreward.reward.critic import LMFeatures
from tdreward.reward.terms import expected_association, next_token_stats


def unwrap(lm: nn.Module) -> nn.Module:
    """The causal LM inside `lm`: a PEFT model wraps it, and its layers (with adapters) live
    in the base model."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def context_length(lm: nn.Module) -> int:
    cfg = unwrap(lm).config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 2048


def forward_hidden(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final (normed) hidden states [B, T, D] without computing any logits."""
    base = unwrap(lm)
    decoder = getattr(base, base.base_model_prefix)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def logits_fn(lm: nn.Module):
    base = unwrap(lm)
    return base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


def _single_pass(lm, input_ids, attention_mask, tile_elems):
    hidden = forward_hidden(lm, input_ids, attention_mask)
    head, softcap = logits_fn(lm)
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)  # last column: no target
    logp, ent, log_z = next_token_stats(hidden, head, targets, tile_elems, softcap)
    return hidden, logp[:, :-1], ent, log_z


def _windowed(lm, ids: Tensor, window: int, stride: int, tile_elems: int):
    """One long row [T] in sliding windows -> hidden [T, D], logp [T-1], entropy [T], log Z [T]."""
    T = ids.shape[0]
    head, softcap = logits_fn(lm)
    hidden = None
    logp = torch.zeros(T, device=ids.device)
    ent = torch.zeros(T, device=ids.device)
    log_z = torch.zeros(T, device=ids.device)
    for begin, end, n_new in chunk_token_windows(T, window, stride):
        h = forward_hidden(lm, ids[None, begin:end], torch.ones_like(ids[None, begin:end]))
        h_new = h[0, -n_new:].to(ids.device)  # a model spread over devices ends elsewhere
        if hidden is None:
            hidden = torch.zeros(T, h.shape[-1], dtype=h.dtype, device=ids.device)
        pos = torch.arange(end - n_new, end, device=ids.device)
        tgt = ids[(pos + 1).clamp(max=T - 1)]
        lp, e, z = next_token_stats(h_new, head, tgt, tile_elems, softcap)
        hidden[pos], logp[pos], ent[pos], log_z[pos] = h_new, lp, e, z
    return hidden, logp[:-1], ent, log_z


def extract_features(
    lm: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    done: Tensor | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    tile_elems: int = 1 << 21,
    association: tuple[Tensor, float, float] | None = None,
) -> LMFeatures:
    """LMFeatures for a right-padded batch. `done` defaults to: the last token of every row is
    the real end of its document (terminal). Rows longer than `max_length` use sliding windows.
    `association` = (log p0, tau, lam) of the critic also gives the exact E_p[c_t] of every
    prediction (`expected_c`), which rbar needs."""
    B, T = input_ids.shape
    window = max_length or context_length(lm)
    if done is None:
        lengths = attention_mask.sum(1)
        done = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
        done[torch.arange(B, device=input_ids.device), (lengths - 1).clamp(min=0)] = True
    if window >= T:
        hidden, logp, ent, log_z = _single_pass(lm, input_ids, attention_mask, tile_elems)
        hidden = hidden.to(input_ids.device)  # a model spread over devices ends elsewhere
    else:
        stride = stride or window // 2
        rows = []
        for b in range(B):
            n = int(attention_mask[b].sum())
            rows.append(_windowed(lm, input_ids[b, :n], window, stride, tile_elems))
        D = rows[0][0].shape[-1]
        hidden = rows[0][0].new_zeros(B, T, D)
        logp = hidden.new_zeros(B, T - 1, dtype=torch.float32)
        ent = hidden.new_zeros(B, T, dtype=torch.float32)
        log_z = torch.zeros_like(ent)
        for b, (h, lp, e, z) in enumerate(rows):
            n = h.shape[0]
            hidden[b, :n], logp[b, : n - 1], ent[b, :n], log_z[b, :n] = h, lp, e, z
    mask = attention_mask.to(torch.long)
    logp = logp * mask[:, 1:]
    expected_c = None
    if association is not None:
        log_p0, tau, lam = association
        head, softcap = logits_fn(lm)
        expected_c = expected_association(hidden, head, log_z, input_ids, mask, log_p0, tau, lam,
                                          softcap)
    # The critic reads float32 whatever the LM's dtype: its LayerNorm, belief filter and TD
    # sums would round in bfloat16 (log p, entropy and E_p[c] are float32 already).
    return LMFeatures(input_ids, mask, hidden.float(), logp, ent * mask, done, expected_c)
