"""ITD-RMAD: exact reverse-mode differentiation through the unrolled inner loop."""
from __future__ import annotations


def unroll(problem, theta, steps, inner_lr):
    """θᴷ from θ by ``steps`` differentiable SGD steps."""
    for _ in range(steps):
        theta = theta - inner_lr * problem.grad(theta)
    return theta


def itd(problem, trajectory, outer_grad, config):
    """vᵀ dθᴷ/dθ by a vector-Jacobian product of the unrolled loop: through the trajectory's own graph when
    the inner loop recorded one (one task at a time), else by running the loop again (K gradient passes)."""
    with problem.second_order():
        return problem.vjp(lambda theta: unroll(problem, theta, config.inner_steps, config.inner_lr), trajectory[0],
                           outer_grad, value=trajectory[-1])


itd.differentiates_inner_loop = True  # GeSSLStep records the inner loop's graph for it where it can
