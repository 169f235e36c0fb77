"""Continuous-batching generation on llama.cpp's low-level API.

llama-cpp-python's high-level `Llama.generate` decodes one sequence at a time through a Python
sampling loop; on the embedded SmolLM2 that loop, not the model, set the pace. This module drives
`llama_decode` directly: up to `n_parallel` sequences share every decode call (each in its own
KV-cache sequence), a finished sequence's slot is refilled with the next prompt at once, and
tokens are sampled in numpy from the raw logits, which also give each token's log-prob.

Sampling is seeded per prompt, so a prompt's completion does not depend on which other prompts
share its batch (up to float rounding: llama.cpp's kernels for 1 and for n rows differ).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tdreward.errors import TDRewardError


@dataclass
class _Slot:
    """One sequence being decoded: a prompt's tokens, then one sampled token per step."""

    index: int  # the prompt's position in the caller's list
    seq_id: int  # its KV-cache sequence
    pending: list[int]  # tokens to feed at the next decode (the prompt, then the last sample)
    pos: int  # position of pending[0]
    budget: int
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def sample_from_logits(logits: np.ndarray, temperature: float, top_p: float,
                       rng: np.random.Generator) -> tuple[int, float]:
    """(token, its log-prob under the raw logits): greedy at temperature 0, else sampled
    from softmax(logits / temperature) restricted to the smallest top-p nucleus."""
    peak = float(logits.max())
    shifted = logits - peak
    log_z = float(np.log(np.exp(shifted, dtype=np.float32).sum(dtype=np.float64)))
    if temperature == 0:
        token = int(np.argmax(logits))
    else:
        p = np.exp(shifted.astype(np.float64) / temperature)  # the peak is at 0: no overflow
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
            q = p[keep] / p[keep].sum()
            token = int(keep[min(int(np.searchsorted(np.cumsum(q), rng.random())), len(q) - 1)])
        else:
            token = min(int(np.searchsorted(np.cumsum(p), rng.random())), len(p) - 1)
    return token, float(shifted[token]) - log_z


def generate_batched(llama_cpp: Any, model: Any, vocab: Any, context_params: Any,
                     prompts: list[list[int]], budgets: list[int], seeds: list[int],
                     temperature: float, top_p: float,
                     n_parallel: int) -> list[tuple[list[int], list[float]]]:
    """Complete each tokenised prompt with up to budgets[i] tokens (stopping at end-of-generation,
    which is not returned); returns (tokens, log-probs) per prompt, in order.

    `context_params` (llama_context_params) are copied, so that threads, attention and cache
    types match the scoring context; only the sizes and the sequence count change."""
    results: list[tuple[list[int], list[float]]] = [([], []) for _ in prompts]
    todo = deque(i for i in range(len(prompts)) if budgets[i] > 0)
    if not todo:
        return results
    n_parallel = max(1, min(n_parallel, len(todo)))
    # Each sequence gets its own KV cells (kv_unified off: prompts share no prefix), sized to
    # the longest prompt + budget; a decode call holds the new prompts and one token per other.
    per_seq = max(len(prompts[i]) + budgets[i] for i in todo)
    per_seq = -(-per_seq // 256) * 256
    n_batch = per_seq + n_parallel
    params = type(context_params).from_buffer_copy(context_params)
    params.n_ctx = per_seq * n_parallel
    params.n_batch = n_batch
    params.n_ubatch = min(512, n_batch)
    params.n_seq_max = n_parallel
    params.kv_unified = False
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise TDRewardError(f"llama.cpp could not create a context for {n_parallel} sequences")
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    memory = llama_cpp.llama_get_memory(ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    free_ids = list(range(n_parallel))
    active: list[_Slot] = []
    try:
        while todo or active:
            n_fed = sum(len(s.pending) for s in active)
            while todo and free_ids and (not active or n_fed + len(prompts[todo[0]]) <= n_batch):
                i = todo.popleft()
                active.append(_Slot(i, free_ids.pop(), list(prompts[i]), 0, budgets[i],
                                    np.random.default_rng(seeds[i])))
                n_fed += len(prompts[i])
            # llama.cpp splits a batch whose sequence ids are out of order into one micro-batch
            # per sequence, which loses most of the gain of batching: keep them sorted.
            active.sort(key=lambda slot: slot.seq_id)
            n, outputs = 0, []
            for slot in active:
                for j, token in enumerate(slot.pending):
                    batch.token[n] = token
                    batch.pos[n] = slot.pos + j
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = slot.seq_id
                    batch.logits[n] = j == len(slot.pending) - 1
                    n += 1
                outputs.append(n - 1)
            batch.n_tokens = n
            status = llama_cpp.llama_decode(ctx, batch)
            if status != 0:
                raise TDRewardError(f"llama.cpp failed to decode a batch of {n} tokens "
                                    f"(llama_decode returned {status})")
            still: list[_Slot] = []
            for slot, out in zip(active, outputs, strict=True):
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, out),
                                            shape=(n_vocab,))
                token, logprob = sample_from_logits(row, temperature, top_p, slot.rng)
                slot.pos += len(slot.pending)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    done = True
                else:
                    slot.tokens.append(token)
                    slot.logprobs.append(logprob)
                    slot.pending = [token]
                    done = len(slot.tokens) >= slot.budget
                if done:
                    results[slot.index] = (slot.tokens, slot.logprobs)
                    llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
                    free_ids.append(slot.seq_id)
                else:
                    still.append(slot)
            active = still
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return results
