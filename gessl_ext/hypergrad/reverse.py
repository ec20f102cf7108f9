"""The backward recursion through K plain SGD steps, shared by ``fd`` and ``hvp``."""
from __future__ import annotations


def reverse_through_sgd(problem, trajectory, outer_grad, hessian_vector_product, inner_lr):
    """u ← u − α H(θᵏ) u for k = K−1, …, 0, starting from u = ∂L/∂θᴷ.

    θᵏ⁺¹ = θᵏ − α∇ℓ(θᵏ) has Jacobian I − αH(θᵏ) (symmetric), so this is the exact chain rule when
    ``hessian_vector_product(problem, θ, u)`` is exact. Returns dL/dθ⁰ [P].
    """
    u = outer_grad
    for theta_k in reversed(trajectory[:-1]):
        u = u - inner_lr * hessian_vector_product(problem, theta_k, u)
    return u
