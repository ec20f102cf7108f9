"""ITD-RMAD: exact reverse-mode differentiation through the unrolled inner loop."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Hypergradient, register_hypergradient


@register_hypergradient("itd")
@dataclass(frozen=True)
class ITD(Hypergradient):
    """vᵀ dθᴷ/dθ by reverse mode through the K inner steps (exact): through the loop's recorded graph one task
    at a time, by running the loop again under ``vjp`` when tasks are batched."""

    differentiates_inner_loop = True
    uses_adapted_weights = False   # inner_loop_vjp reads θᴷ only from a recorded graph, which the problem keeps

    def __call__(self, problem, trajectory, outer_grad):
        return problem.inner_loop_vjp(trajectory, outer_grad)
