"""The backward recursion through K plain SGD steps, shared by ``fd`` and ``hvp``."""
from __future__ import annotations


def reverse_through_sgd(trajectory, outer_grad, step_back):
    """u ← step_back(θᵏ, u) ≈ (I − αH(θᵏ)) u for k = K−1, …, 0, starting from u = ∂L/∂θᴷ.

    θᵏ⁺¹ = θᵏ − α∇ℓ(θᵏ) has the symmetric Jacobian I − αH(θᵏ), so this is the exact chain rule when
    ``step_back`` is exact. Returns dL/dθ⁰ [P].
    """
    u = outer_grad
    for theta_k in reversed(trajectory[:-1]):
        u = step_back(theta_k, u)
    return u
