"""First-order approximation: dθᴷ/dθ taken as the identity."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Hypergradient, register_hypergradient


@register_hypergradient("first_order")
@dataclass(frozen=True)
class FirstOrder(Hypergradient):
    """dL/dθ ≈ ∂L/∂θᴷ: no second-order term, no extra passes (biased; see docs/hypergradients.md)."""

    uses_adapted_weights = False

    def __call__(self, problem, trajectory, outer_grad):
        return outer_grad
