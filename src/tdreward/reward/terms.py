"""The immediate-reward terms of docs/design.md §2.1, for all positions at once.

Pure torch. Shapes: B texts, T tokens, V vocabulary, D hidden size. Position t predicts token
t+1, so per-prediction tensors have T-1 columns (the last token has no target).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def logprob_and_entropy(
    hidden: Tensor,
    lm_head: torch.nn.Module,
    targets: Tensor,
    tile_elems: int = 1 << 21,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """log p(target) and predictive entropy (nats): `next_token_stats` without log Z."""
    logp, ent, _ = next_token_stats(hidden, lm_head, targets, tile_elems, softcap)
    return logp, ent


@torch.no_grad()
def next_token_stats(
    hidden: Tensor,
    lm_head: torch.nn.Module,
    targets: Tensor,
    tile_elems: int = 1 << 21,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """log p(target), predictive entropy (nats) and log Z (the log-partition of the logits)
    from final hidden states (no gradient). log Z is what the exact expected reward needs
    (`expected_association`): with it, p(v) of any token is one dot product away.

    hidden [..., D], targets [...] (any value where there is no target; mask it later).
    The logits never exist whole: they are built a tile of (rows x vocabulary slice) at a
    time, about `tile_elems` floats, and reduced by an online softmax (running max m, sum
    s = sum e^(l-m) and u = sum e^(l-m) (l-m) per row): log Z = m + log s, H = log s - u / s.
    Tiling the vocabulary rather than the positions reads the output embedding once per
    block of rows instead of once per small chunk, and each pass over a tile touches 8 MB
    rather than hundreds: on a 262k vocabulary this costs about what the output matmul alone
    costs (`benchmarks/bench_score.py`).
    """
    if type(lm_head) is not torch.nn.Linear:
        # A LoRA-wrapped or quantised head computes more than x W^T + b: whole rows through
        # the module itself.
        return _stats_by_rows(hidden, lm_head, targets, tile_elems, softcap)
    weight, bias = lm_head.weight, lm_head.bias
    shape = targets.shape
    # The product runs in the head's own dtype (bfloat16 on a GPU: its fast path); each tile of
    # logits is cast to float32 before the sums over the vocabulary, which bfloat16 would round.
    h = hidden.reshape(-1, hidden.shape[-1]).to(device=weight.device, dtype=weight.dtype)
    y = targets.reshape(-1).to(weight.device)
    n, vocab = h.shape[0], weight.shape[0]
    rows = min(n, 8192)
    cols = min(vocab, max(256, tile_elems // max(rows, 1) // 64 * 64))
    logp = torch.empty(n, dtype=torch.float32, device=h.device)
    ent, log_z = torch.empty_like(logp), torch.empty_like(logp)
    for a in range(0, n, rows):
        hb, yb = h[a : a + rows], y[a : a + rows]
        m = torch.full((hb.shape[0],), -torch.inf, device=h.device)
        s, u, target = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
        for v0 in range(0, vocab, cols):
            v1 = min(vocab, v0 + cols)
            logits = F.linear(hb, weight[v0:v1], None if bias is None else bias[v0:v1]).float()
            if softcap:
                logits = torch.tanh_(logits.div_(softcap)).mul_(softcap)
            hit = ((yb >= v0) & (yb < v1)).nonzero().squeeze(1)
            if hit.numel():
                target[hit] = logits[hit, yb[hit] - v0]
            m_new = torch.maximum(m, logits.amax(dim=-1))
            shift = m - m_new  # <= 0; -inf - finite = -inf on the first tile: exp -> 0
            scale = torch.exp(shift)
            logits.sub_(m_new[:, None])
            e = torch.exp(logits)
            # s and u are relative to the running max; moving it from m to m_new turns
            # e^(l-m) (l-m) into scale * e^(l-m) ((l-m) + shift), so u <- scale (u + shift s).
            u = scale * (u + torch.nan_to_num(shift, neginf=0.0) * s) + torch.linalg.vecdot(e, logits)
            s = scale * s + e.sum(-1)
            m = m_new
        log_s = torch.log(s)
        log_z[a : a + rows] = m + log_s
        logp[a : a + rows] = target - (m + log_s)
        ent[a : a + rows] = log_s - u / s
    # Where the targets are: with a model spread over devices the head may sit elsewhere.
    return tuple(t.view(shape).to(targets.device) for t in (logp, ent, log_z))


def _stats_by_rows(hidden, lm_head, targets, tile_elems, softcap):
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).to(h.device)
    vocab = getattr(lm_head, "out_features", None) or lm_head(h[:1]).shape[-1]
    step = max(1, tile_elems // vocab)
    logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    ent, log_z = torch.empty_like(logp), torch.empty_like(logp)
    for i in range(0, h.shape[0], step):
        logits = lm_head(h[i : i + step]).float()
        if softcap:
            logits = torch.tanh_(logits.div_(softcap)).mul_(softcap)
        log_z[i : i + step] = torch.logsumexp(logits, dim=-1)
        lsm = torch.log_softmax(logits, dim=-1)
        tgt = y[i : i + step].clamp(0, lsm.shape[-1] - 1)
        logp[i : i + step] = lsm.gather(1, tgt[:, None]).squeeze(1)
        ent[i : i + step] = -torch.linalg.vecdot(torch.exp(lsm), lsm)
    return tuple(t.view(shape).to(targets.device) for t in (logp, ent, log_z))


def trace_horizon(tau: float, length: int) -> int:
    """How far back eligibility traces reach: weights below 1e-12 are dropped."""
    return max(1, min(length, math.ceil(tau * 12 * math.log(10))))


def retrospective_association(
    input_ids: Tensor,
    mask: Tensor,
    log_p0: Tensor,
    tau: float,
    lam: float,
    query_chunk: int = 2048,
) -> Tensor:
    """c_t of docs/design.md §2.1 for the outcome x_{t+1} of every position t.

    E_t(v) = sum_{s<=t, x_s=v} exp(-(t-s)/tau); q_t = E_t / sum_u E_t(u);
    c_t = log((1-lam) p0(x_{t+1}) + lam q_t(x_{t+1})) - log p0(x_{t+1}).
    input_ids, mask: [B, T]; returns [B, T-1]. Only tokens with mask 1 enter the traces.
    """
    B, T = input_ids.shape
    n = T - 1
    if n <= 0:
        return input_ids.new_zeros((B, 0), dtype=torch.float32)
    H = trace_horizon(tau, T)
    device = input_ids.device
    # Keys padded on the left so that window k of query t covers tokens t-H+1 .. t.
    keys = F.pad(input_ids, (H - 1, 0), value=-1)
    kmask = F.pad(mask.bool(), (H - 1, 0), value=False)
    keys = torch.where(kmask, keys, torch.full_like(keys, -1))
    ages = torch.arange(H - 1, -1, -1, device=device, dtype=torch.float32)
    w = torch.exp(-ages / tau)  # weight of each slot in a window, oldest first
    targets = input_ids[:, 1:]
    E = torch.empty(B, n, device=device)
    Z = torch.empty(B, n, device=device)
    for a in range(0, n, query_chunk):
        b = min(n, a + query_chunk)
        win = keys[:, a : b + H - 1].unfold(1, H, 1)  # [B, b-a, H]
        wmask = kmask[:, a : b + H - 1].unfold(1, H, 1)
        E[:, a:b] = ((win == targets[:, a:b, None]) * w).sum(-1)
        Z[:, a:b] = (wmask * w).sum(-1)
    q = E / Z.clamp_min(1e-30)
    lp0 = log_p0[targets.clamp(0, log_p0.shape[0] - 1)]
    mix = torch.logaddexp(math.log1p(-lam) + lp0, math.log(lam) + torch.log(q)) if lam > 0 else lp0
    return mix - lp0


def immediate_reward(logp: Tensor, c: Tensor, entropy: Tensor, alpha: float, beta: float) -> Tensor:
    """r_t = log p(x_{t+1} | x_<=t) - alpha c_t + beta H_t."""
    return logp - alpha * c + beta * entropy


@torch.no_grad()
def expected_association(
    hidden: Tensor,
    lm_head: torch.nn.Module,
    log_z: Tensor,
    input_ids: Tensor,
    mask: Tensor,
    log_p0: Tensor,
    tau: float,
    lam: float,
    softcap: float | None = None,
    chunk: int = 256,
) -> Tensor:
    """E_{v ~ p(.|x<=t)}[c_t(v)] of the prediction made at every position t, exactly: [B, T]
    (the last position too: its prediction has no target in the text, but a value).

    c_t(v) = log((1-lam) + lam q_t(v) / p0(v)) is log(1-lam) for every token outside the
    eligibility window (q_t(v) = 0), so only the window's distinct tokens need p(v):
    E_p[c_t] = log(1-lam) + sum_{v in window} p(v) [c_t(v) - log(1-lam)],
    p(v) = exp(logit_t(v) - log Z_t) with `log_z` [B, T] from `next_token_stats`.
    For a chunk of positions the windows' tokens are few (at most chunk + horizon distinct
    ones, usually far fewer than the vocabulary): their logits are one small matrix product
    with the gathered output-embedding rows, and the traces E_t(v) one scatter-add.
    hidden [B, T, D]; 0 where lam is 0 (c is 0) and on padding.
    """
    B, T = input_ids.shape
    out = torch.zeros(B, T, device=input_ids.device)
    if T == 0 or lam <= 0:
        return out
    base = math.log1p(-lam)
    H = trace_horizon(tau, T)
    keys = F.pad(input_ids, (H - 1, 0), value=0)
    kmask = F.pad(mask.bool(), (H - 1, 0), value=False)
    ages = torch.arange(H - 1, -1, -1, device=input_ids.device, dtype=torch.float32)
    w = torch.exp(-ages / tau)  # weight of each slot of a window, oldest first
    linear = type(lm_head) is torch.nn.Linear

    def logits_of(h: Tensor, ids: Tensor) -> Tensor:  # h [P, D], ids [K] -> [P, K]
        if linear:  # the head's dtype for the product, float32 from the logits on
            weight = lm_head.weight
            ids_w = ids.to(weight.device)
            lg = F.linear(h.to(device=weight.device, dtype=weight.dtype), weight[ids_w],
                          None if lm_head.bias is None else lm_head.bias[ids_w]).float()
        else:  # a wrapped head computes more than x W^T + b: its whole rows, then the gather
            lg = lm_head(h).float()[:, ids.to(h.device)]
        lg = lg.to(out.device)
        return torch.tanh(lg / softcap) * softcap if softcap else lg

    for b in range(B):
        n_b = int(mask[b].sum())  # right padding: positions past it stay 0
        for a in range(0, n_b, chunk):
            e = min(n_b, a + chunk)
            span, span_ok = keys[b, a : e + H - 1], kmask[b, a : e + H - 1]
            vocab_here, local = torch.unique(span, return_inverse=True)  # [K], [span]
            K = vocab_here.shape[0]
            local = torch.where(span_ok, local, K)  # padding goes to a spare column
            win = local.unfold(0, H, 1)  # [P, H]
            wts = (w * span_ok.unfold(0, H, 1)).float()  # [P, H]
            E = torch.zeros(win.shape[0], K + 1, device=out.device).scatter_add_(1, win, wts)
            E = E[:, :K]
            Z = wts.sum(-1, keepdim=True).clamp_min(1e-30)
            p = torch.exp(logits_of(hidden[b, a:e], vocab_here) - log_z[b, a:e, None].float())
            c = torch.logaddexp(torch.full_like(E, base),
                                math.log(lam) + torch.log((E / Z).clamp_min(1e-30))
                                - log_p0[vocab_here].float())
            out[b, a:e] = base + (p * (c - base) * (E > 0)).sum(-1)
    return out


def expected_reward(entropy: Tensor, expected_c: Tensor, alpha: float, beta: float) -> Tensor:
    """rbar_t = E_{v~p}[r_t(v)] = -H_t + beta H_t - alpha E_p[c_t] (E_p[log p] = -H): the
    reward the reference LM expects before it sees x_{t+1}. Any shape, elementwise."""
    return -entropy + beta * entropy - alpha * expected_c
