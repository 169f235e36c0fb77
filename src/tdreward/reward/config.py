"""Every hyperparameter of the reward and its critic, in one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tdreward.flags import setting
from tdreward.validation import check_choice, validate

# Ranges of the settings: each is checked when a config is built (tdreward.validation).
RULES = {
    "gamma": "[0, 1]", "lam": "[0, 1)", "tau": ">0", "td_lambda": "[0, 1]", "hazard": "(0, 1)",
    "n_belief_states": ">=1", "csc_bins": ">=1", "csc_threshold": ">0", "proj_dim": ">=1",
    "hidden_dim": ">=1", "context_timescales": ">0", "logit_tile_elems": ">=1",
    "centre_timescale": ">0",
}
VALUE_FORMS = ("rbar", "absolute")


@dataclass
class RewardConfig:
    """The reward's and the critic's hyperparameters; each field is also a `train-critic` flag
    (tdreward.flags). Saved with every critic (`to_dict`, `from_dict`)."""

    # Immediate reward r_t = log p(x_{t+1}) - alpha * c_t + beta * H_t  (docs/design.md §2.1)
    alpha: float = setting(0.1, help="weight of the retrospective-association penalty c_t")
    beta: float = setting(0.01, help="weight of the exploration bonus (predictive entropy, "
                          "nats)")
    gamma: float = setting(0.99, help="TD discount")
    tau: float = setting(32.0, help="decay (tokens) of the eligibility traces behind c_t")
    lam: float = setting(0.5, help="mixture weight of the trace distribution in c_t")
    # State representation (docs/design.md §2.2): a name in the belief registry
    state: str = setting("belief", help="state model: belief, csc or hidden")
    n_belief_states: int = setting(2, help="belief states of the belief state model")
    belief_state_names: list[str] = setting(
        default_factory=lambda: ["wait", "pre_transition"],
        help="names of the belief states (state_0, state_1, ... when their number differs)",
        default_help="wait pre_transition")
    hazard: float = setting(0.05, help="initial P(wait -> pre_transition) per token")
    csc_bins: int = setting(16, help="bins of the complete-serial-compound clock")
    csc_threshold: float = setting(6.0, help="surprisal (nats) of an observed token that "
                                   "resets the clock")
    # Critic heads (docs/design.md §2.3)
    proj_dim: int = setting(32, help="width of the critic's projection of the hidden state")
    hidden_dim: int = setting(64, help="hidden width of the belief and value networks")
    # Slow context for V: causal moving averages of the observation features (surprisal,
    # association, entropy) over these time scales in tokens. With gamma 0.99 a value is an
    # average over ~100 future tokens: it depends on how predictable the text has been lately,
    # which one token's hidden state does not say.
    context_timescales: list[float] = setting(
        default_factory=lambda: [10.0, 100.0, 1000.0], nargs="*",
        help="time scales (tokens) of the slow context V sees: moving averages of surprisal, "
        "association and entropy; none for no slow context", default_help="10 100 1000")
    # Off by default since 0.2: with 20k training tokens the learned head overfits the
    # hidden state's per-token detail (held-out EV_MC 0.055 with it, 0.085 without, and a
    # noisier delta; README § Critic training).
    value_uses_hidden: bool = setting(
        False, help="the learned head W also sees proj(h_t), not only the state and the slow "
        "context (with a slow context; without one it always sees proj(h_t))")
    # V_t = rbar_t + gamma C_t (docs/design.md §2.3): the exact one-step expectation rbar_t
    # plus the continuation C_t = m_t / (1 - gamma) + W_t, m_t a moving average of rbar (the
    # reward centre, learning-free) and W_t the learned head (0 untrained). "absolute" is the
    # layout of critics saved before 0.2: V = the head alone, no rbar, no centre.
    value_form: str = setting("rbar", help="rbar: V = rbar + gamma (m/(1-gamma) + W), the "
                              "learned head W on top of the exact one-step expectation and "
                              "the reward centre m; absolute: V = W (critics before 0.2)")
    centre_timescale: float = setting(100.0, help="time scale (tokens) of the reward centre m_t, "
                                      "a causal moving average of rbar")
    # TD(lambda) for learning the critic (docs/design.md §2.4)
    td_lambda: float = setting(0.9, help="lambda of the TD(lambda) targets")
    # Floats per tile (rows x vocabulary slice) when turning hidden states into log-probs and
    # entropies: bounds memory to a few such tiles instead of batch x length x vocab; 2M
    # floats (8 MB) was the fastest of the tile sizes tried on a 2-core CPU.
    logit_tile_elems: int = setting(1 << 21, help="floats per tile when turning hidden states "
                                    "into log-probs and entropies (bounds memory)")

    def __post_init__(self) -> None:
        validate(self, RULES, {"lam": "the reward's lam (trace mixture weight)"})
        check_choice("--value_form", self.value_form, VALUE_FORMS)
        if self.state == "belief" and len(self.belief_state_names) != self.n_belief_states:
            self.belief_state_names = (
                ["wait", "pre_transition"]
                if self.n_belief_states == 2
                else [f"state_{i}" for i in range(self.n_belief_states)]
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RewardConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        d.setdefault("context_timescales", [])  # critics saved before slow context existed
        d.setdefault("value_form", "absolute")  # critics saved before V = rbar + gamma C
        d.setdefault("value_uses_hidden", True)  # its default before 0.2
        return cls(**{k: v for k, v in d.items() if k in names})
