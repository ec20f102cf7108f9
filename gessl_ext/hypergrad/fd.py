"""AID-FD (DARTS; the paper's default, Appendix G.4): Hessian-vector products by central finite differences.

H u ≈ (∇ℓ(θ + εu) − ∇ℓ(θ − εu)) / 2ε with ε = r / ‖u‖. Exact as r → 0 only when ∇ℓ is continuous;
on ReLU / max-pool networks the quotient also counts gradient jumps (see docs/hypergradients.md).
Memory: θ − εu is written over θ + εu once ∇ℓ(θ + εu) is computed, and each gradient is folded into u in place
(:func:`gessl_ext.inner.sgd_update_vjp_`), piece by piece (``problem.grad_pieces``: per parameter under vmap, never
concatenated into a flat vector), so a gradient pass holds u, one perturbed point and its own gradient: three
per-task parameter copies. Under vmap the point is per-parameter tensors (``problem.point_from_flat``), which batched
convolutions use as they are instead of copying each weight in every pass. With ``problem.use_kernels``, θ + εu is
the fused ``gessl_ext.ops.fd_perturb`` (norm and axpy in one op on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..inner import sgd_update_vjp_
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
    uses_adapted_weights = False

    def step_back(self, problem, theta, u):
        """u − αĤu at θ, Ĥu the central difference of ∇ℓ at θ ± εu, ε = radius / ‖u‖; computed in u's storage."""
        perturb = ops.fd_perturb if problem.use_kernels else ops.fd_perturb_reference
        point, eps = perturb(theta, u, self.radius)
        point = problem.point_from_flat(point)                  # θ + εu
        g_plus = problem.grad_pieces(point)
        parts = zip(problem.pieces(point), problem.pieces(theta), problem.pieces(u), strict=True)
        for part, theta_part, u_part in parts:      # θ − εu in θ + εu's storage, with no temporary, before u changes
            part.copy_(u_part).mul_(-eps).add_(theta_part)
        weight = (0.5 / eps).unsqueeze(-1)   # Ĥu = weight · (g₊ − g₋), one weight per task
        for u_part, g_part in zip(problem.pieces(u), g_plus, strict=True):
            sgd_update_vjp_(u_part, g_part, weight, problem.inner_lr)
        del g_plus, g_part
        for u_part, g_part in zip(problem.pieces(u), problem.grad_pieces(point), strict=True):
            sgd_update_vjp_(u_part, g_part, -weight, problem.inner_lr)
        return u

    def __call__(self, problem, trajectory, outer_grad):
        return reverse_through_sgd(trajectory, outer_grad, lambda theta, u: self.step_back(problem, theta, u))
