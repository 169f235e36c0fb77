"""The TD reward core on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tdreward import RewardConfig, TDRewardModel
from tdreward.reward import STATE_REGISTRY, BeliefStateModel, register_state
from tdreward.reward.terms import logprob_and_entropy, retrospective_association

TEXT = (
    "The hippocampus and the striatum both learn from reward. Dopamine neurons fire when a "
    "reward is better than predicted, and pause when it is worse."
)


def _randomise_heads(model: TDRewardModel, seed: int = 1) -> TDRewardModel:
    """Give the critic non-trivial weights so V, beliefs and delta all vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.critic.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    model.critic.value_scale.fill_(3.0)
    return model


@pytest.fixture()
def rm(tiny_lm, tokenizer) -> TDRewardModel:
    return _randomise_heads(TDRewardModel.from_lm(tiny_lm, tokenizer, "tiny"))


def _ids(rm, text=TEXT):
    return rm.encode([text])[0]


def test_logp_matches_brute_force_per_position(rm, tiny_lm):
    ids = _ids(rm)
    s = rm.score([ids])[0]
    x = torch.tensor([ids])
    brute = []
    with torch.no_grad():
        for t in range(len(ids) - 1):
            logits = tiny_lm(x[:, : t + 1]).logits[0, -1]
            brute.append(torch.log_softmax(logits.double(), -1)[ids[t + 1]].item())
    assert len(s.logp) == len(ids) - 1
    assert max(abs(a - b) for a, b in zip(s.logp, brute)) < 1e-5


@pytest.mark.parametrize("tile_elems", [1, 21 * 300, 1 << 21, 1 << 30])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_tiled_logprob_and_entropy_match_full_softmax(tiny_lm, tile_elems, softcap):
    """The online softmax over vocabulary tiles equals the full log_softmax, whether the
    vocabulary is cut into hundreds of tiles, a few, or none; with a softcap and a bias too,
    and through the row-wise path a wrapped head takes."""
    torch.manual_seed(0)
    h = torch.randn(3, 7, tiny_lm.config.hidden_size) * 4
    y = torch.randint(0, tiny_lm.config.vocab_size, (3, 7))
    head = tiny_lm.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
    wrapped = torch.nn.Sequential(head)  # not a plain Linear: the row-wise fallback
    for module in (head, biased, wrapped):
        logp, ent = logprob_and_entropy(h, module, y, tile_elems, softcap)
        with torch.no_grad():
            logits = module(h).double()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            full = torch.log_softmax(logits, -1)
        assert torch.allclose(logp.double(), full.gather(-1, y[..., None]).squeeze(-1), atol=2e-5)
        assert torch.allclose(ent.double(), -(full.exp() * full).sum(-1), atol=2e-4)


def test_changing_one_token_changes_r_and_delta_there_and_nothing_before(rm):
    a = _ids(rm)
    k = len(a) // 2
    b = list(a)
    b[k] = (a[k] + 1234) % len(rm.tokenizer)
    # Each text alone: rows of one padded batch may differ by an ulp in the LM's matmuls, which
    # the randomised heads amplify to ~1e-4 on values of some hundreds.
    (sa,), (sb,) = rm.score([a]), rm.score([b])
    # Position k-1 predicts token k: its reward and TD error change ...
    assert abs(sa.r[k - 1] - sb.r[k - 1]) > 1e-4
    assert abs(sa.delta[k - 1] - sb.delta[k - 1]) > 1e-4
    # ... and nothing that happened before it does (the critic is causal).
    for key in ("logp", "c", "H", "r", "delta"):
        assert getattr(sa, key)[: k - 1] == pytest.approx(getattr(sb, key)[: k - 1], abs=1e-5)
    assert sa.V[:k] == pytest.approx(sb.V[:k], abs=1e-5)
    for t in range(k):
        assert sa.belief[t] == pytest.approx(sb.belief[t], abs=1e-6)


def test_beliefs_are_probability_vectors(rm):
    s = rm.score([TEXT])[0]
    b = torch.tensor(s.belief)
    assert b.shape == (len(s.tokens), 2)
    assert s.state_names == ["wait", "pre_transition"]
    assert torch.all(b >= 0)
    assert torch.allclose(b.sum(-1), torch.ones(len(b)), atol=1e-5)
    assert b[:, 0].std() > 1e-4  # the randomised filter actually moves


def test_td_error_identity(rm):
    """Reward-centred delta (docs/design.md §2.3): with Vd = V - m/(1-gamma),
    delta_t = r_t - m_t + gamma Vd_{t+1} - Vd_t, which is r_t + gamma V_{t+1} - V_t less the
    revision gamma (m_{t+1} - m_t)/(1-gamma) of the centre; into a terminal state r_t - V_t.
    Levels reach -1000 nats on this random model in float32: 1e-3 absolute is their rounding."""
    ids = _ids(rm)
    n = len(ids) - 1
    gamma = rm.config.gamma
    for terminal_at_end in (False, True):
        out = rm.score_batch(*rm.pad([ids]), terminal_at_end=terminal_at_end)
        r, V, delta = out["r"][0].double(), out["values"][0].double(), out["delta"][0].double()
        m = out["centre"][0].double()
        assert torch.allclose(out["rbar"][0].double() + gamma * (m / (1 - gamma)
                              + out["W"][0].double()), V, atol=1e-3)
        for t in range(n):
            # The text's end bootstraps unless it is declared terminal (or is an EOS).
            done_next = terminal_at_end and t + 1 == n
            if done_next:
                expect = r[t] - V[t]
            else:
                expect = (r[t] + gamma * V[t + 1] - V[t]
                          - gamma * (m[t + 1] - m[t]) / (1 - gamma))
            assert delta[t].item() == pytest.approx(expect.item(), abs=1e-3)
    eos = rm.tokenizer.eos_token_id
    out = rm.score_batch(*rm.pad([ids[:5] + [eos] + ids[5:]]))
    r, V, delta = out["r"][0], out["values"][0], out["delta"][0]
    assert delta[4].item() == pytest.approx((r[4] - V[4]).item(), abs=1e-4)  # EOS: terminal
    s = rm.score([ids])[0]
    assert s.summary["td_reward"] == pytest.approx(sum(s.delta) / n, abs=1e-5)
    assert s.summary["return"] == pytest.approx(
        sum(gamma**t * x for t, x in enumerate(s.r)), rel=1e-5)
    assert s.summary["perplexity"] == pytest.approx(math.exp(-sum(s.logp) / n), rel=1e-5)


def test_retrospective_association_matches_hand_computation():
    ids = [5, 7, 5, 9, 5, 7]
    V, tau, lam = 10, 2.0, 0.5
    p0 = torch.tensor([0.05] * 5 + [0.3, 0.05, 0.2, 0.05, 0.1])
    p0 = p0 / p0.sum()
    c = retrospective_association(
        torch.tensor([ids]), torch.ones(1, len(ids)), p0.log(), tau, lam
    )[0]
    for t in range(len(ids) - 1):
        y = ids[t + 1]
        E = {v: 0.0 for v in range(V)}
        for s in range(t + 1):
            E[ids[s]] += math.exp(-(t - s) / tau)
        q = E[y] / sum(E.values())
        expect = math.log((1 - lam) * p0[y].item() + lam * q) - math.log(p0[y].item())
        assert c[t].item() == pytest.approx(expect, abs=1e-5)
    # An outcome absent from memory sits at the bound log(1 - lam).
    assert c[0].item() == pytest.approx(math.log(1 - lam), abs=1e-6)


def test_save_load_round_trip_gives_identical_scores(rm, tmp_path, tiny_lm, tokenizer):
    rm.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / "critic.safetensors").is_file()
    again = TDRewardModel.from_pretrained(tmp_path / "critic", lm=tiny_lm, tokenizer=tokenizer)
    a, b = rm.score([TEXT])[0], again.score([TEXT])[0]
    assert a.delta == b.delta and a.V == b.V and a.belief == b.belief
    assert again.config == rm.config


def test_padded_batch_equals_one_by_one(rm):
    texts = [TEXT, "Short one.", TEXT[:60] + " and more text to make a middle length."]
    batched = rm.score(texts, batch_size=3)
    for text, b in zip(texts, batched):
        single = rm.score([text])[0]
        # delta is a difference of values ~100x larger: float32 cancellation scales with |V|.
        tol = 1e-4 + 2e-6 * max(abs(v) for v in single.V)
        for key in ("logp", "r", "V", "delta"):
            assert getattr(b, key) == pytest.approx(getattr(single, key), rel=1e-5, abs=tol)


def test_sliding_windows_agree_with_single_pass_where_both_fit(rm, tokenizer):
    ids = rm.encode([TEXT * 3])[0]
    assert len(ids) > 80
    full = rm.score([ids], max_length=len(ids))[0]
    windowed = rm.score([ids], max_length=48, stride=16)[0]
    assert len(windowed.logp) == len(full.logp)  # every token scored exactly once
    # The first window sees the whole prefix: identical there.
    assert windowed.logp[:47] == pytest.approx(full.logp[:47], abs=1e-5)
    # Later tokens lose distant context, so they differ somewhere.
    assert max(abs(a - b) for a, b in zip(windowed.logp[48:], full.logp[48:])) > 1e-4


def test_compute_td_reward_depends_on_the_prediction(rm):
    a = rm.compute_td_reward("The capital of France is", " Paris")
    b = rm.compute_td_reward("The capital of France is", " a banana")
    assert a != pytest.approx(b, abs=1e-6)


def test_state_registry_and_user_state_model(tiny_lm, tokenizer):
    assert {"belief", "csc", "hidden"} <= set(STATE_REGISTRY)

    @register_state("always_one")
    class AlwaysOne(BeliefStateModel):
        def __init__(self, config, obs_dim):
            torch.nn.Module.__init__(self)
            self.config, self.obs_dim, self.state_names = config, obs_dim, ["one"]

        def forward(self, obs, mask):
            return obs.new_ones(obs.shape[0], obs.shape[1], 1)

    try:
        for state, dim in (("csc", 16), ("hidden", 0), ("always_one", 1)):
            m = TDRewardModel.from_lm(tiny_lm, tokenizer, "tiny", RewardConfig(state=state))
            s = m.score([TEXT])[0]
            assert len(s.belief[0]) == dim
            if state == "csc":
                assert all(sum(b) == pytest.approx(1.0) for b in s.belief)
    finally:
        STATE_REGISTRY.pop("always_one")
    with pytest.raises(ValueError, match="unknown state"):
        RewardConfig(state="nope") and TDRewardModel.from_lm(
            tiny_lm, tokenizer, "tiny", RewardConfig(state="nope"))


def test_untrained_delta_is_surprise_relative_to_the_lms_expectation(tiny_lm, tokenizer):
    """W = 0: delta_t = (r_t - rbar_t) + gamma (rbar_{t+1} - m_{t+1}) (docs/design.md §2.3)."""
    m = TDRewardModel.from_lm(tiny_lm, tokenizer, "tiny")
    ids, mask = m.pad(m.encode([TEXT]))
    out = m.score_batch(ids, mask)
    n = int(mask.sum()) - 1
    r, rbar, cen = out["r"][0, :n], out["rbar"][0], out["centre"][0]
    expect = (r - rbar[:n]) + m.config.gamma * (rbar[1 : n + 1] - cen[1 : n + 1])
    assert torch.allclose(out["delta"][0, :n], expect, atol=1e-4)
    assert torch.count_nonzero(out["W"]) == 0 and not m.trained
    s = m.score([TEXT])[0]
    assert s.rbar == pytest.approx(rbar[:n].tolist(), abs=1e-6)


def test_critic_saved_before_rbar_loads_in_its_old_layout(tiny_lm, tokenizer, tmp_path, caplog):
    """A critic whose config predates value_form (V = the head alone, plain TD error) still
    loads, says so, keeps its old V and delta, and reports rbar beside them."""
    from safetensors.torch import load_file, save_file

    from tdreward.critic_files import CONFIG_METADATA_KEY, CONFIG_NAME, WEIGHTS_NAME

    rm = _randomise_heads(TDRewardModel.from_lm(tiny_lm, tokenizer, "tiny",
                                                RewardConfig(value_uses_hidden=True)))
    rm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key in ("value_form", "centre_timescale", "value_uses_hidden"):
        meta["reward_config"].pop(key)
    weights = load_file(str(tmp_path / WEIGHTS_NAME))
    save_file(weights, str(tmp_path / WEIGHTS_NAME),
              metadata={CONFIG_METADATA_KEY: json.dumps(meta)})
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="tdreward"):
        old = TDRewardModel.from_pretrained(tmp_path, lm=tiny_lm, tokenizer=tokenizer)
    assert "saved before V = rbar + gamma C" in caplog.text
    assert old.config.value_form == "absolute" and old.config.value_uses_hidden
    out = old.score_batch(*old.pad([_ids(old)]))
    W, _ = old.critic.head(out["feats"], old.critic.association(out["feats"]))
    assert torch.allclose(out["values"], W)  # V is the head alone
    r, V = out["r"][0], out["values"][0]
    assert torch.allclose(out["delta"][0], r + old.config.gamma * V[1:] - V[:-1], atol=1e-3)
    assert "rbar" in out and out["rbar"].shape == out["values"].shape
