"""Finite-difference perturbation of flat per-task parameter vectors.

With theta, u [..., P] (each leading index is one task's flat parameter vector):

    fd_perturb(theta, u, radius) -> (theta + eps*u, eps),  eps = radius / max(||u||, tiny)

eps [...] is float32 (float64 for float64 inputs); tiny is torch.finfo(theta.dtype).tiny. The sign of
radius gives the direction, so fd_perturb(theta, u, r) and fd_perturb(theta, u, -r) are the two points of
a central difference, (g(theta + eps*u) - g(theta - eps*u)) / (2*eps) ~ H u, which the caller forms.
Custom op ``gessl_ext::fd_perturb``: the fused kernel of csrc/fd_hvp.cu for CUDA tensors when the
extension is built, the PyTorch reference below everywhere else. It is not differentiable (the fd
hypergradient only evaluates it); vmap batches over tasks.
"""
import torch
from torch import Tensor

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
    """Plain-PyTorch ``fd_perturb``: (theta + eps*u [..., P] in theta's dtype, eps [...]).

    Computed in float32 (float64 for float64 inputs) and rounded once to theta's dtype.
    """
    compute = accumulation_dtype(theta.dtype)
    direction = u.to(compute)
    norm = torch.linalg.vector_norm(direction, dim=-1)
    eps = radius / norm.clamp_min(torch.finfo(theta.dtype).tiny)
    return (theta.to(compute) + eps[..., None] * direction).to(theta.dtype), eps


@torch.library.custom_op("gessl_ext::fd_perturb", mutates_args=())
def _fd_perturb_op(theta: Tensor, u: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    return fd_perturb_reference(theta, u, radius)


@_fd_perturb_op.register_kernel("cuda")
def _fd_perturb_cuda(theta, u, radius):
    if EXTENSION is None:
        return fd_perturb_reference(theta, u, radius)
    perturbed, eps = EXTENSION.fd_perturb(as_rows(theta), as_rows(u), radius)
    return perturbed.reshape(theta.shape), eps.reshape(theta.shape[:-1])


@_fd_perturb_op.register_fake
def _fd_perturb_fake(theta, u, radius):
    return torch.empty_like(theta), theta.new_empty(theta.shape[:-1], dtype=accumulation_dtype(theta.dtype))


@_fd_perturb_op.register_vmap
def _fd_perturb_vmap(info, in_dims, theta, u, radius):
    theta, u = batch_to_front(info.batch_size, in_dims, (theta, u))
    return _fd_perturb_op(theta, u, radius), (0, 0)


def fd_perturb(theta, u, radius):
    """theta + eps*u with eps = radius / max(||u||, tiny) per row.

    Args:
        theta, u: [..., P] (at least one dim), same shape, floating dtype and device.
        radius: finite nonzero Python number; its sign is the direction (negative: theta - |eps| u).

    Returns:
        (perturbed [..., P] in theta's dtype, eps [...] in float32, float64 for float64 inputs).

    Raises:
        TypeError: non-tensor or non-floating theta / u, mismatched dtypes, radius not a number.
        ValueError: 0-dim theta, mismatched shapes or devices, radius zero, inf or nan.
    """
    check_float_tensor("theta", theta)
    if theta.dim() < 1:
        raise ValueError("theta must be [..., P] with at least one dim, got a 0-dim tensor")
    check_same_layout("u", u, "theta", theta)
    return _fd_perturb_op(theta, u, check_finite_scalar("radius", radius, nonzero=True))
