"""AID-FD (DARTS; the paper's default, Appendix G.4): Hessian-vector products by central finite differences.

H u ≈ (∇ℓ(θ + εu) − ∇ℓ(θ − εu)) / 2ε with ε = r / ‖u‖. Exact as r → 0 only when ∇ℓ is continuous;
on ReLU / max-pool networks the quotient also counts gradient jumps (see docs/hypergradients.md).
With ``problem.use_kernels`` the perturbation and the update u − αĤu are the fused ``gessl_ext.ops`` (one
pass over parameter memory each on CUDA), whose references are the plain-PyTorch forms of the same update.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from .base import Hypergradient, register_hypergradient, setting
from .reverse import reverse_through_sgd


@register_hypergradient("fd")
@dataclass(frozen=True)
class FD(Hypergradient):
    """dL/dθ through the K inner steps with finite-difference HVPs (2 gradient passes per step; Appendix G.4).

    Args:
        radius: r > 0; each step's HVP is the central difference at θ ± εu with ε = r / ‖u‖, so r is the length
            of the perturbation in parameter space. The error is O(r²) on smooth networks; on ReLU / max-pool
            networks it does not vanish as r → 0, and under bf16 / fp16 autocast a smaller r amplifies rounding
            (docs/hypergradients.md).
    """

    radius: float = setting(0.01, "finite-difference radius r (ε = r / ‖u‖)", minimum=0.0, inclusive=False)

    def step_back(self, problem, theta, u):
        """u − αĤu at θ, Ĥu the central difference of ∇ℓ at θ ± εu, ε = radius / ‖u‖ (0 when u = 0)."""
        if problem.use_kernels:
            perturb, update = ops.fd_perturb, ops.fd_update
        else:
            perturb, update = ops.fd_perturb_reference, ops.fd_update_reference
        theta_plus, theta_minus, eps = perturb(theta, u, self.radius)
        g_plus = problem.grad(theta_plus)
        del theta_plus   # freed before the second gradient pass, the peak of the step
        return update(u, g_plus, problem.grad(theta_minus), eps, problem.inner_lr)

    def __call__(self, problem, trajectory, outer_grad):
        return reverse_through_sgd(trajectory, outer_grad, lambda theta, u: self.step_back(problem, theta, u))
