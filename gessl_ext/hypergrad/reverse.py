"""The backward recursion through the K inner SGD steps, shared by ``fd`` and ``hvp``."""
from __future__ import annotations


def reverse_through_sgd(trajectory, outer_grad, step_back):
    """u ← step_back(θᵏ, u) = uᵀ ∂(θᵏ − α∇ℓ(θᵏ))/∂θᵏ for k = K−1, …, 0, starting from u = ∂L/∂θᴷ.

    Each step's Jacobian I − αH(θᵏ) is symmetric, so this is the exact chain rule when ``step_back`` is exact
    (``problem.update_vjp``). Returns dL/dθ⁰ [P].
    """
    u = outer_grad
    for theta_k in reversed(trajectory[:-1]):
        u = step_back(theta_k, u)
    return u
