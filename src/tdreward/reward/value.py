"""The value function V(s_t) = MLP([proj(h_t); b_t]) (docs/design.md §2.3)."""

from __future__ import annotations

from torch import Tensor, nn


class ValueFunction(nn.Module):
    """Predicts the value in normalised units; the critic maps it back with its stored scale.

    The output layer starts at zero, so an untrained critic says V = 0 everywhere (and
    delta_t = r_t) instead of random numbers.
    """

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(), nn.Linear(hidden_dim, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)
