"""Every hyperparameter of the reward and its critic, in one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tdreward.validation import validate

# Ranges of the settings: each is checked when a config is built (tdreward.validation).
RULES = {
    "gamma": "[0, 1]", "lam": "[0, 1)", "tau": ">0", "td_lambda": "[0, 1]", "hazard": "(0, 1)",
    "n_belief_states": ">=1", "csc_bins": ">=1", "csc_threshold": ">0", "proj_dim": ">=1",
    "hidden_dim": ">=1", "context_timescales": ">0", "logit_tile_elems": ">=1",
}


@dataclass
class RewardConfig:
    # Immediate reward r_t = log p(x_{t+1}) - alpha * c_t + beta * H_t  (docs/design.md §2.1)
    alpha: float = 0.1  # weight of the retrospective-association penalty c_t
    beta: float = 0.01  # weight of the exploration bonus (predictive entropy, nats)
    gamma: float = 0.99  # TD discount
    tau: float = 32.0  # decay (tokens) of the eligibility traces behind c_t
    lam: float = 0.5  # mixture weight of the trace distribution in c_t
    # State representation (docs/design.md §2.2): a name in the belief registry
    state: str = "belief"
    n_belief_states: int = 2
    belief_state_names: list[str] = field(default_factory=lambda: ["wait", "pre_transition"])
    hazard: float = 0.05  # initial P(wait -> pre_transition) per token
    csc_bins: int = 16  # bins of the complete-serial-compound clock
    csc_threshold: float = 6.0  # surprisal (nats) of an observed token that resets the clock
    # Critic heads (docs/design.md §2.3)
    proj_dim: int = 32
    hidden_dim: int = 64
    # Slow context for V: causal moving averages of the observation features (surprisal,
    # association, entropy) over these time scales in tokens. With gamma 0.99 a value is an
    # average over ~100 future tokens: it depends on how predictable the text has been lately,
    # which one token's hidden state does not say.
    context_timescales: list[float] = field(default_factory=lambda: [10.0, 100.0, 1000.0])
    value_uses_hidden: bool = True  # V also sees proj(h_t) (not only belief + context)
    # TD(lambda) for learning the critic (docs/design.md §2.4)
    td_lambda: float = 0.9
    # Floats per tile (rows x vocabulary slice) when turning hidden states into log-probs and
    # entropies: bounds memory to a few such tiles instead of batch x length x vocab; 2M
    # floats (8 MB) was the fastest of the tile sizes tried on a 2-core CPU.
    logit_tile_elems: int = 1 << 21

    def __post_init__(self) -> None:
        validate(self, RULES, {"lam": "the reward's lam (trace mixture weight)"})
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
        return cls(**{k: v for k, v in d.items() if k in names})
