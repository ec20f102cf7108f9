"""First-order approximation: dθᴷ/dθ taken as the identity."""


def first_order(problem, trajectory, outer_grad, config):
    """dL/dθ ≈ ∂L/∂θᴷ (no second-order term, no extra passes)."""
    return outer_grad
