"""Finite-difference Hessian-vector product helpers over flat per-task parameter vectors.

With theta, u [..., P] (each leading index is one task's flat parameter vector):

    fd_perturb(theta, u, radius) -> (theta + eps*u, theta - eps*u, eps),  eps = radius / max(||u||, tiny)
    fd_update(u, g_plus, g_minus, eps, alpha) -> u - alpha * (g_plus - g_minus) / (2*eps)

so with g_pm the gradients at theta +- eps*u, the update applies u <- u - alpha * H u with one
central difference. eps [...] is float32 (float64 for float64 inputs); tiny is torch.finfo(theta.dtype).tiny.
Custom ops ``gessl_ext::fd_perturb`` / ``gessl_ext::fd_update``: fused kernels of csrc/fd_hvp.cu
for CUDA tensors when the extension is built, the PyTorch reference below everywhere else.
They are not differentiable (the fd hypergradient only evaluates them); vmap batches over tasks.
"""
import torch
from torch import Tensor

from ..inner import sgd_update_vjp

from ._backends import (
    EXTENSION,
    accumulation_dtype,
    as_rows,
    batch_to_front,
    check_finite_scalar,
    check_float_tensor,
    check_same_layout,
)


def fd_perturb_reference(theta, u, radius):
    """Plain-PyTorch ``fd_perturb``: (theta_plus, theta_minus [..., P] in theta's dtype, eps [...])."""
    compute = accumulation_dtype(theta.dtype)
    direction = u.to(compute)
    norm = torch.linalg.vector_norm(direction, dim=-1)
    eps = radius / norm.clamp_min(torch.finfo(theta.dtype).tiny)
    step = eps[..., None] * direction
    base = theta.to(compute)
    return (base + step).to(theta.dtype), (base - step).to(theta.dtype), eps


def fd_update_reference(u, g_plus, g_minus, eps, alpha):
    """Plain-PyTorch ``fd_update``: u - alpha * (g_plus - g_minus) / (2*eps) per row, in u's dtype."""
    compute = accumulation_dtype(u.dtype)
    quotient = (g_plus.to(compute) - g_minus.to(compute)) / (2 * eps.to(compute)[..., None])
    return sgd_update_vjp(u.to(compute), quotient, alpha).to(u.dtype)


@torch.library.custom_op("gessl_ext::fd_perturb", mutates_args=())
def _fd_perturb_op(theta: Tensor, u: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    return fd_perturb_reference(theta, u, radius)


@_fd_perturb_op.register_kernel("cuda")
def _fd_perturb_cuda(theta, u, radius):
    if EXTENSION is None:
        return fd_perturb_reference(theta, u, radius)
    theta_plus, theta_minus, eps = EXTENSION.fd_perturb(as_rows(theta), as_rows(u), radius)
    return theta_plus.reshape(theta.shape), theta_minus.reshape(theta.shape), eps.reshape(theta.shape[:-1])


@_fd_perturb_op.register_fake
def _fd_perturb_fake(theta, u, radius):
    eps = theta.new_empty(theta.shape[:-1], dtype=accumulation_dtype(theta.dtype))
    return torch.empty_like(theta), torch.empty_like(theta), eps


@_fd_perturb_op.register_vmap
def _fd_perturb_vmap(info, in_dims, theta, u, radius):
    theta, u = batch_to_front(info.batch_size, in_dims, (theta, u))
    return _fd_perturb_op(theta, u, radius), (0, 0, 0)


@torch.library.custom_op("gessl_ext::fd_update", mutates_args=())
def _fd_update_op(u: Tensor, g_plus: Tensor, g_minus: Tensor, eps: Tensor, alpha: float) -> Tensor:
    return fd_update_reference(u, g_plus, g_minus, eps, alpha)


@_fd_update_op.register_kernel("cuda")
def _fd_update_cuda(u, g_plus, g_minus, eps, alpha):
    if EXTENSION is None:
        return fd_update_reference(u, g_plus, g_minus, eps, alpha)
    out = EXTENSION.fd_update(as_rows(u), as_rows(g_plus), as_rows(g_minus), eps.reshape(-1), alpha)
    return out.reshape(u.shape)


@_fd_update_op.register_fake
def _fd_update_fake(u, g_plus, g_minus, eps, alpha):
    return torch.empty_like(u)


@_fd_update_op.register_vmap
def _fd_update_vmap(info, in_dims, u, g_plus, g_minus, eps, alpha):
    args = batch_to_front(info.batch_size, in_dims, (u, g_plus, g_minus, eps))
    return _fd_update_op(*args, alpha), 0


def _check_rows(name, t):
    check_float_tensor(name, t)
    if t.dim() < 1:
        raise ValueError(f"{name} must be [..., P] with at least one dim, got a 0-dim tensor")


def fd_perturb(theta, u, radius):
    """theta, u [..., P] -> (theta + eps*u, theta - eps*u, eps [...]), eps = radius / max(||u||, tiny) per row."""
    _check_rows("theta", theta)
    check_same_layout("u", u, "theta", theta)
    radius = check_finite_scalar("radius", radius, positive=True)
    return _fd_perturb_op(theta, u, radius)


def fd_update(u, g_plus, g_minus, eps, alpha):
    """u, g_plus, g_minus [..., P]; eps [...] (or 0-dim, shared by all rows) -> u - alpha*(g_plus - g_minus)/(2*eps)."""
    _check_rows("u", u)
    check_same_layout("g_plus", g_plus, "u", u)
    check_same_layout("g_minus", g_minus, "u", u)
    check_float_tensor("eps", eps)
    rows_shape = u.shape[:-1]
    if eps.shape not in (rows_shape, ()):
        raise ValueError(f"eps must have shape {tuple(rows_shape)} (one per row) or be 0-dim, got {tuple(eps.shape)}")
    if eps.device != u.device:
        raise ValueError(f"eps must be on u's device {u.device}, got {eps.device}")
    alpha = check_finite_scalar("alpha", alpha, positive=False)
    eps = eps.to(accumulation_dtype(u.dtype)).expand(rows_shape)
    return _fd_update_op(u, g_plus, g_minus, eps, alpha)
