"""rbar_t, the exact one-step expected reward, against brute force over the whole vocabulary."""

from __future__ import annotations

import torch

from conftest import EMBEDDED, make_tiny_lm
from tdreward.data.corpus import split_wikitext_articles
from tdreward.reward.lm import forward_hidden
from tdreward.reward.metrics import critic_diagnostics, doc_from_score
from tdreward.reward.terms import (
    expected_association,
    expected_reward,
    immediate_reward,
    next_token_stats,
    retrospective_association,
)
from tdreward.reward_model import TDRewardModel


def test_rbar_equals_the_expectation_of_r_over_every_next_token():
    vocab, T, alpha, beta, tau, lam = 40, 14, 0.3, 0.05, 3.0, 0.5
    lm = make_tiny_lm(vocab, seed=2, hidden_size=32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (2, T), generator=g)  # a small alphabet: the window repeats
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded row
    counts = torch.randint(0, 50, (vocab,), generator=g).double()
    log_p0 = ((counts + 1) / (counts + 1).sum()).log().float()  # non-uniform p0
    head = lm.get_output_embeddings()
    with torch.no_grad():
        hidden = forward_hidden(lm, ids, mask)
        _, ent, log_z = next_token_stats(hidden, head, torch.cat([ids[:, 1:], ids[:, :1]], 1))
        ec = expected_association(hidden, head, log_z, ids, mask, log_p0, tau, lam, chunk=5)
        rbar = expected_reward(ent, ec, alpha, beta)
        full = torch.log_softmax(lm(input_ids=ids, attention_mask=mask).logits.double(), -1)
    for b in range(2):
        n = int(mask[b].sum())
        for t in range(n - 1):
            p = full[b, t].exp()
            total = 0.0
            for v in range(vocab):  # every possible next token
                x = ids[b : b + 1].clone()
                x[0, t + 1] = v
                c = retrospective_association(x, mask[b : b + 1], log_p0, tau, lam)[0, t]
                r = immediate_reward(full[b, t, v].float(), c, ent[b, t], alpha, beta)
                total += float(p[v]) * float(r)
            assert abs(total - float(rbar[b, t])) < 1e-5, (b, t, total, float(rbar[b, t]))


def test_untrained_delta_is_less_predictable_than_r(smollm2, wikitext_text):
    """Without a critic V = rbar + gamma m/(1-gamma): delta is the surprise relative to the
    LM's own expectation, far less predictable from the state than r itself (V = 0)."""
    lm, tok = smollm2
    rm = TDRewardModel.from_lm(lm, tok, EMBEDDED)
    doc = doc_from_score(rm.score([split_wikitext_articles(wikitext_text)[0]])[0])
    gamma = rm.config.gamma
    default = critic_diagnostics([doc], gamma)
    v0 = critic_diagnostics([doc | {"delta": doc["r"], "V": torch.zeros_like(doc["r"])}], gamma)
    assert default["delta_r2"] < v0["delta_r2"], (default, v0)
    assert default["delta_r2"] <= 0.05, default
    assert abs(default["corr_delta_H"]) < abs(v0["corr_delta_H"]), (default, v0)
