"""Batched per-task inner SGD step: theta [..., P] - lr * grad [..., P] for all tasks at once.

Custom op ``gessl_ext::task_sgd`` (fused kernel of csrc/task_sgd.cu for CUDA tensors when the
extension is built, the PyTorch reference elsewhere). With ``return_norm`` it also returns the
per-task gradient norm [...] (float32, float64 for float64 inputs), accumulated from the same reads
on CUDA. Differentiable (the ``itd`` hypergradient backpropagates through inner steps), vmap-able.
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


def _sgd_step_and_norm(theta, grad, lr, return_norm):
    """(theta - lr*grad, ||grad|| per row or an empty [0] tensor) in plain PyTorch."""
    compute = accumulation_dtype(theta.dtype)
    g = grad.to(compute)
    stepped = (theta.to(compute) - lr * g).to(theta.dtype)
    norm = torch.linalg.vector_norm(g, dim=-1) if return_norm else theta.new_empty(0, dtype=compute)
    return stepped, norm


def task_sgd_reference(theta, grad, lr, return_norm=False):
    """Plain-PyTorch ``task_sgd``."""
    stepped, norm = _sgd_step_and_norm(theta, grad, lr, return_norm)
    return (stepped, norm) if return_norm else stepped


@torch.library.custom_op("gessl_ext::task_sgd", mutates_args=())
def _task_sgd_op(theta: Tensor, grad: Tensor, lr: float, return_norm: bool) -> tuple[Tensor, Tensor]:
    return _sgd_step_and_norm(theta, grad, lr, return_norm)


@_task_sgd_op.register_kernel("cuda")
def _task_sgd_cuda(theta, grad, lr, return_norm):
    if EXTENSION is None:
        return _sgd_step_and_norm(theta, grad, lr, return_norm)
    stepped, norm = EXTENSION.task_sgd(as_rows(theta), as_rows(grad), lr, return_norm)
    return stepped.reshape(theta.shape), norm.reshape(theta.shape[:-1]) if return_norm else norm


@_task_sgd_op.register_fake
def _task_sgd_fake(theta, grad, lr, return_norm):
    norm_shape = theta.shape[:-1] if return_norm else (0,)
    return torch.empty_like(theta), theta.new_empty(norm_shape, dtype=accumulation_dtype(theta.dtype))


def _setup_context(ctx, inputs, output):
    _, grad, lr, return_norm = inputs
    ctx.lr, ctx.return_norm = lr, return_norm
    ctx.save_for_backward(grad, output[1] if return_norm else None)


def _backward(ctx, grad_stepped, grad_norm):
    grad, norm = ctx.saved_tensors
    grad_of_grad = -ctx.lr * grad_stepped
    if ctx.return_norm:
        # d||g||/dg = g/||g||, taken as 0 at g = 0 like torch.linalg.vector_norm.
        scale = torch.where(norm > 0, grad_norm / norm, torch.zeros_like(norm))
        grad_of_grad = grad_of_grad + (scale[..., None] * grad).to(grad_of_grad.dtype)
    return grad_stepped, grad_of_grad, None, None


_task_sgd_op.register_autograd(_backward, setup_context=_setup_context)


class _TaskSGDFunction(torch.autograd.Function):
    """The op with the same backward, as an autograd.Function so torch.func.grad reaches it
    (pytorch/pytorch#170834: custom ops' register_autograd does not support functorch transforms)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(theta, grad, lr, return_norm):
        return _task_sgd_op(theta, grad, lr, return_norm)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


@_task_sgd_op.register_vmap
def _task_sgd_vmap(info, in_dims, theta, grad, lr, return_norm):
    theta, grad = batch_to_front(info.batch_size, in_dims, (theta, grad))
    return _task_sgd_op(theta, grad, lr, return_norm), (0, 0 if return_norm else None)


def task_sgd(theta, grad, lr, return_norm=False):
    """theta, grad [..., P] -> theta - lr*grad (and ||grad|| per row [...] when return_norm)."""
    check_float_tensor("theta", theta)
    if theta.dim() < 1:
        raise ValueError("theta must be [..., P] with at least one dim, got a 0-dim tensor")
    check_same_layout("grad", grad, "theta", theta)
    lr = check_finite_scalar("lr", lr, positive=False)
    stepped, norm = _TaskSGDFunction.apply(theta, grad, lr, bool(return_norm))
    return (stepped, norm) if return_norm else stepped
