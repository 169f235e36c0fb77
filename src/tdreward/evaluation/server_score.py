"""`tdreward score --model openai:URL#MODEL`: the reward of texts from a server's prompt
log-probs, without a local copy of the model (docs/design.md §2.1).

Per predicted token the server gives log p(x_t | x_<t) and the top K alternatives. What
follows from them:

* log p: exact (the server's own number).
* c_t: exact: it needs only the text's tokens and p0. An untrained critic's p0 is uniform over
  the vocabulary, so the server must report its size (llama.cpp's llama-server does, in
  /v1/models `meta.n_vocab`); where it does not (vLLM, llama-cpp-python), scoring needs
  --alpha 0 (r = log p + beta H) and c is left at 0: a guessed size would shift every c by
  the log of the guess's error. Token identity is the id where the server sends ids (vLLM),
  else the token's string (llama-cpp-python), so two ids that print alike count as one.
* H: a lower bound from the top K: with p_i the top-K probabilities, tail mass
  m = 1 - sum p_i and p_K the K-th largest, every tail token has p <= p_K, so
  H >= sum -p_i log p_i + m (-log p_K). Exact when m = 0; `summary["mean_tail_mass"]` says how
  much was unseen. r = log p - alpha c + beta H inherits the bound through beta H only.
* E_p[c_t]: a lower bound: sum over the window's tokens whose p is known (top K or the seen
  token) of p(v) (c_t(v) - log(1-lam)); every term left out is >= 0.
* rbar = (beta - 1) H - alpha E_p[c]: approximate (both parts are bounds).
* V, delta: an untrained critic's (W = 0): V = rbar - m_t + m_t / (1 - gamma), delta the
  reward-centred TD error, both from the approximate rbar. A trained critic needs the LM's
  hidden states, which a server does not return: --reward_model_path is refused.
* The first token of a text has no prediction (the API nulls it), so a text of N server
  tokens gives N - 1 scored tokens, the 2nd to the last. EOS is not recognised (no ids):
  a text's end is terminal only with --terminal_at_end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from tdreward.backends.server_logprobs import DEFAULT_TOP_K, PromptLogprobs, ServerLogprobs
from tdreward.errors import TDRewardError
from tdreward.reward.averages import causal_ema
from tdreward.reward.config import RewardConfig
from tdreward.reward.td import centred_td_errors, discounted_return
from tdreward.reward.terms import retrospective_association, trace_horizon
from tdreward.reward_model import TextScore

log = logging.getLogger("tdreward")


def entropy_lower_bound(top: dict[str, float], k: int) -> tuple[float, float]:
    """(H lower bound, tail mass) of one prediction from its top-K log-probs (see above)."""
    lps = sorted(top.values(), reverse=True)
    ps = [math.exp(v) for v in lps]
    head = sum(-p * v for p, v in zip(ps, lps))
    tail = max(0.0, 1.0 - sum(ps))
    # The K-th largest bounds the tail; the seen token may be an extra (K+1)-th entry,
    # smaller than every tail token could be.
    p_k = ps[min(k, len(ps)) - 1]
    return head + (tail * -math.log(p_k) if tail > 0 else 0.0), tail


class ServerScorer:
    """Scores texts like TDRewardModel.score, from an OpenAI-compatible server."""

    trained = False

    def __init__(self, spec: str, config: RewardConfig | None = None,
                 top_k: int = DEFAULT_TOP_K, vocab_size: int | None = None) -> None:
        """`vocab_size` stands in for a server that does not report it (for p0)."""
        self.base_model = spec
        self.config = config or RewardConfig()
        self.top_k = top_k
        self.client = ServerLogprobs(spec, top_k)
        self.vocab_size = vocab_size or self.client.vocab_size
        if self.vocab_size is None and self.config.alpha != 0 and self.config.lam > 0:
            raise TDRewardError(
                f"{self.client.url} does not report its vocabulary size, which c_t's base rate "
                "p0 = 1/vocabulary needs: pass --alpha 0 (r = log p + beta H) or serve the "
                "model with llama.cpp's llama-server (it reports n_vocab)")

    def score(self, texts: str | Sequence[str], batch_size: int = 8,
              max_length: int | None = None, stride: int | None = None,
              progress: bool = False, terminal_at_end: bool = False) -> list[TextScore]:
        """TextScores of `texts`, one request each (batch_size, max_length and stride are the
        server's business: a text longer than its context fails with the server's message)."""
        if isinstance(texts, str):
            texts = [texts]
        it: Sequence[str] = texts
        if progress and len(texts) > 1:
            from tqdm.auto import tqdm

            it = tqdm(texts, desc="scoring", unit="text")
        return [self.text_score(self.client.text_logprobs(t), terminal_at_end) for t in it]

    def text_score(self, lp: PromptLogprobs, terminal_at_end: bool = False) -> TextScore:
        cfg = self.config
        n_tok = len(lp.tokens)
        # Identities as small ints; 0 is the prefix the text is read after ("a text starts
        # here"), which the transformers path also keeps in the traces.
        names: dict[str, int] = {}
        ids = [0] + [names.setdefault(lp.identity(i), len(names) + 1) for i in range(n_tok)]
        scored = [i for i in range(n_tok) if lp.logp[i] is not None]
        if scored != list(range(1, n_tok)):
            raise TDRewardError(f"{self.client.url} sent log-probs for tokens {scored[:5]}...: "
                                "expected every token after the first")
        log_v = -math.log(self.vocab_size) if self.vocab_size else 0.0
        lam = cfg.lam if self.vocab_size else 0.0  # alpha is 0 then (checked above)
        input_ids = torch.tensor([ids])
        log_p0 = torch.full((len(names) + 1,), log_v)
        # c of the prediction of every token (x_1 included); x_1's is not scored.
        c_all = retrospective_association(input_ids, torch.ones_like(input_ids), log_p0,
                                          cfg.tau, lam)[0] if lam else torch.zeros(n_tok)
        # States s_1..s_N (after x_1..x_N): s_t predicts x_{t+1}, the last one the text's
        # continuation (final_top when the server sent it, else the previous prediction's).
        tops = [lp.top[i] for i in range(1, n_tok)] + [lp.final_top or lp.top[n_tok - 1]]
        H, tail = zip(*(entropy_lower_bound(t or {}, self.top_k) for t in tops))
        e_c = self.expected_c(ids, {i: s for s, i in names.items()}, tops, log_v, lam)
        rbar = [(cfg.beta - 1) * h - cfg.alpha * ec for h, ec in zip(H, e_c)]
        logp = torch.tensor([lp.logp[i] for i in scored])
        c = c_all[1:]  # predictions of x_2..x_N
        Ht = torch.tensor(H)
        r = logp - cfg.alpha * c + cfg.beta * Ht[:-1]
        V, delta = self.untrained_values(torch.tensor(rbar), r, terminal_at_end)
        n = len(scored)
        summary = {
            "td_reward": float(delta.mean()), "mean_r": float(r.mean()),
            "mean_rbar": float(sum(rbar[:n]) / n),
            "return": float(discounted_return(r[None], torch.ones_like(r[None]),
                                              cfg.gamma)[0]),
            "perplexity": float(math.exp(-float(logp.mean()))), "n_tokens": n,
            "mean_tail_mass": float(sum(tail[:n]) / n),
        }
        return TextScore(
            token_ids=[lp.ids[i] for i in range(n_tok)] if lp.ids is not None else [],
            tokens=[lp.tokens[i] for i in scored], logp=logp.tolist(), c=c.tolist(),
            H=list(H[:n]), r=r.tolist(), rbar=rbar[:n], V=V[:n].tolist(),
            delta=delta.tolist(), belief=[[] for _ in scored], state_names=[],
            summary=summary)

    def expected_c(self, ids: list[int], names: dict[int, str],
                   tops: list[dict[str, float] | None], log_v: float,
                   lam: float) -> list[float]:
        """Lower bound of E_p[c_t] of each state s_1..s_N: the window's tokens whose p is
        known. `ids` are the small ints of text_score (0: the prefix), `names` their
        identities (the keys of the top-K dicts). The traces follow
        retrospective_association: weights exp(-age/tau) over the last `horizon` tokens."""
        if not lam:
            return [0.0] * len(tops)
        cfg = self.config
        base = math.log1p(-lam)
        decay = math.exp(-1.0 / cfg.tau)
        horizon = trace_horizon(cfg.tau, len(ids))
        trace: dict[int, float] = {ids[0]: 1.0}
        out = []
        for t, top in enumerate(tops, start=1):  # state s_t has seen ids[0..t]
            trace = {v: w * decay for v, w in trace.items()}
            trace[ids[t]] = trace.get(ids[t], 0.0) + 1.0
            if t >= horizon:  # the token leaving the window (as retrospective_association)
                old = ids[t - horizon]
                trace[old] -= decay ** horizon
            z = sum(trace.values())
            total = 0.0
            for v, w in trace.items():
                p_lp = (top or {}).get(names[v]) if v else None  # the prefix is never predicted
                if p_lp is None or w <= 1e-12:
                    continue
                mix = math.log(lam) + math.log(w / z) - log_v
                hi, lo = max(base, mix), min(base, mix)
                total += math.exp(p_lp) * (hi + math.log1p(math.exp(lo - hi)) - base)
            out.append(base + total)
        return out

    def untrained_values(self, rbar: torch.Tensor, r: torch.Tensor,
                         terminal_at_end: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """V and delta of an untrained rbar-form critic (W = 0), TDCritic.value_parts."""
        cfg = self.config
        mask = torch.ones(1, rbar.shape[0])
        centre = causal_ema(rbar[None, :, None], mask, cfg.centre_timescale)[0, :, 0]
        level = centre / (1 - cfg.gamma) if cfg.gamma < 1 else torch.zeros_like(centre)
        v_diff = rbar - centre
        done = torch.zeros(1, rbar.shape[0], dtype=torch.bool)
        if terminal_at_end:
            done[0, -1] = True
        delta = centred_td_errors(r[None], v_diff[None], centre[None], level[None], done,
                                  cfg.gamma)[0]
        return v_diff + level, delta

    def close(self) -> None:
        self.client.close()
