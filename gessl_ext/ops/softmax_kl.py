"""Pair-classification head pi and its KL outer loss, as custom ops (Triton on CUDA, PyTorch elsewhere).

Head (per task): z1, z2 [N, d]; S = cos(z1_i, z2_k) / tau. View-1 row i predicts softmax_k(S[i, :]),
view-2 row k predicts softmax_i(S[:, k]). The outer loss of a task is the mean over the 2N rows of
KL(p_target || p_current), where the target is either given as log-probabilities
``target_logp [..., 2, N, N]`` ([..., 0, i, :] view-1 rows, [..., 1, k, :] view-2 rows) or computed
from target embeddings t1, t2 with the same head. Targets are constants: no gradient flows into them.

All leading dims are tasks: z1, z2 [..., N, d] -> loss [...]. The custom ops are the pair
``gessl_ext::softmax_kl_forward`` (loss plus O(N) row statistics kept for the backward) and
``gessl_ext::softmax_kl_backward``; on CUDA both run the tile-wise Triton kernels in
kernels/softmax_kl.py (fp16/bf16/fp32; float64 uses the PyTorch path), elsewhere the PyTorch
implementation below, whose backward is the same closed form the kernel evaluates.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._backends import (
    accumulation_dtype,
    batch_to_front,
    check_finite_scalar,
    check_float_tensor,
    check_same_layout,
    triton_kernel,
)

NORM_EPS = 1e-12  # as F.normalize: rows shorter than this are divided by NORM_EPS instead of their norm


def pair_logits(z1, z2, temperature):
    """Cosine-similarity logits S [..., N, N] = cos(z1_i, z2_k) / temperature, in the accumulation dtype."""
    compute = accumulation_dtype(z1.dtype)
    a = F.normalize(z1.to(compute), dim=-1, eps=NORM_EPS)
    b = F.normalize(z2.to(compute), dim=-1, eps=NORM_EPS)
    return a @ b.mT / temperature


def _head_log_probs(logits):
    """S [..., N, N] -> (log-probabilities [..., 2, N, N], log-sum-exps [..., 2, N]) of the two directions."""
    lse = torch.stack((logits.logsumexp(-1), logits.logsumexp(-2)), dim=-2)
    logp = torch.stack((logits - lse[..., 0, :, None], logits.mT - lse[..., 1, :, None]), dim=-3)
    return logp, lse


def pair_log_probs(z1, z2, temperature):
    """Head log-probabilities [..., 2, N, N] for embeddings z1, z2 [..., N, d] (the ``target_logp`` layout)."""
    return _head_log_probs(pair_logits(z1, z2, temperature))[0]


def _reference_forward(z1, z2, target_logp, t1, t2, temperature):
    """Plain-PyTorch forward: (loss [...] in z1's dtype, lse [..., 2, N], target_stat [..., 2, N]).

    target_stat is the target log-sum-exp (embedding targets) or the target row mass sum_k p_t
    (log-probability targets); both statistics are in the accumulation dtype.
    """
    logp, lse = _head_log_probs(pair_logits(z1, z2, temperature))
    if target_logp is None:
        target, target_stat = _head_log_probs(pair_logits(t1, t2, temperature).to(logp.dtype))
    else:
        target = target_logp.to(logp.dtype)
        target_stat = target.exp().sum(-1)
    kl_rows = (target.exp() * (target - logp)).sum(-1)
    return kl_rows.mean(dim=(-2, -1)).to(z1.dtype), lse, target_stat


def _reference_backward(grad_loss, z1, z2, target_logp, t1, t2, temperature, lse, target_stat):
    """Closed-form gradient (dz1, dz2) of the loss, as the Triton backward evaluates it (see kernels/softmax_kl.py)."""
    compute = lse.dtype
    x, y = z1.to(compute), z2.to(compute)
    x_norm, y_norm = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
    a, b = x / x_norm.clamp_min(NORM_EPS), y / y_norm.clamp_min(NORM_EPS)
    logits = a @ b.mT / temperature
    p_x = (logits - lse[..., 0, :, None]).exp()
    p_y = (logits - lse[..., 1, None, :]).exp()
    if target_logp is None:
        target_logits = pair_logits(t1, t2, temperature).to(compute)
        g = p_x + p_y - (target_logits - target_stat[..., 0, :, None]).exp() \
            - (target_logits - target_stat[..., 1, None, :]).exp()
    else:
        target = target_logp.to(compute)
        g = p_x * target_stat[..., 0, :, None] + p_y * target_stat[..., 1, None, :] \
            - target[..., 0, :, :].exp() - target[..., 1, :, :].mT.exp()
    g = g * (grad_loss.to(compute) / (2 * z1.shape[-2]))[..., None, None]
    grad_a, grad_b = g @ b / temperature, g.mT @ a / temperature

    def through_normalize(unit, norm, grad_unit):
        radial = unit * (unit * grad_unit).sum(-1, keepdim=True)
        return torch.where(norm > NORM_EPS, grad_unit - radial, grad_unit) / norm.clamp_min(NORM_EPS)

    return through_normalize(a, x_norm, grad_a).to(z1.dtype), through_normalize(b, y_norm, grad_b).to(z2.dtype)


def _triton_launcher(z1, t1):
    """The Triton kernel module when it can take these inputs (t1: target embeddings or None), else None."""
    kernel, _ = triton_kernel("softmax_kl")
    if kernel is None or z1.numel() == 0 or math.prod(z1.shape[:-2]) > kernel.MAX_TASKS \
            or z1.shape[-1] > kernel.MAX_FEATURES:
        return None
    if any(t is not None and t.dtype not in kernel.SUPPORTED_DTYPES for t in (z1, t1)):
        return None
    return kernel


def _as_task_batch(z1, z2, target_logp, t1, t2):
    """Flattens the leading task dims: [..., N, d] -> [B, N, d] (and target_logp -> [B, 2, N, N])."""
    n, d = z1.shape[-2:]
    flat = lambda t, tail: None if t is None else t.reshape(-1, *tail)  # noqa: E731
    return (flat(z1, (n, d)), flat(z2, (n, d)), flat(target_logp, (2, n, n)), flat(t1, (n, d)),
            flat(t2, (n, d)))


@torch.library.custom_op("gessl_ext::softmax_kl_forward", mutates_args=())
def _forward_op(z1: Tensor, z2: Tensor, target_logp: Optional[Tensor], t1: Optional[Tensor], t2: Optional[Tensor],
                temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    return _reference_forward(z1, z2, target_logp, t1, t2, temperature)


@_forward_op.register_kernel("cuda")
def _forward_cuda(z1, z2, target_logp, t1, t2, temperature):
    kernel = _triton_launcher(z1, t1)
    if kernel is None:
        return _reference_forward(z1, z2, target_logp, t1, t2, temperature)
    x, y, logp, u1, u2 = _as_task_batch(z1, z2, target_logp, t1, t2)
    loss, lse, target_stat = kernel.softmax_kl_forward(x, y, temperature, NORM_EPS, target_logp=logp, t1=u1, t2=u2)
    stat_shape = (*z1.shape[:-2], 2, z1.shape[-2])
    return loss.to(z1.dtype).reshape(z1.shape[:-2]), lse.reshape(stat_shape), target_stat.reshape(stat_shape)


@_forward_op.register_fake
def _forward_fake(z1, z2, target_logp, t1, t2, temperature):
    stat_shape = (*z1.shape[:-2], 2, z1.shape[-2])
    stat_dtype = accumulation_dtype(z1.dtype)
    return (z1.new_empty(z1.shape[:-2]), z1.new_empty(stat_shape, dtype=stat_dtype),
            z1.new_empty(stat_shape, dtype=stat_dtype))


@torch.library.custom_op("gessl_ext::softmax_kl_backward", mutates_args=())
def _backward_op(grad_loss: Tensor, z1: Tensor, z2: Tensor, target_logp: Optional[Tensor], t1: Optional[Tensor],
                 t2: Optional[Tensor], temperature: float, lse: Tensor, target_stat: Tensor) -> tuple[Tensor, Tensor]:
    return _reference_backward(grad_loss, z1, z2, target_logp, t1, t2, temperature, lse, target_stat)


@_backward_op.register_kernel("cuda")
def _backward_cuda(grad_loss, z1, z2, target_logp, t1, t2, temperature, lse, target_stat):
    kernel = _triton_launcher(z1, t1)
    if kernel is None:
        return _reference_backward(grad_loss, z1, z2, target_logp, t1, t2, temperature, lse, target_stat)
    x, y, logp, u1, u2 = _as_task_batch(z1, z2, target_logp, t1, t2)
    n = z1.shape[-2]
    dz1, dz2 = kernel.softmax_kl_backward(grad_loss.reshape(-1), x, y, temperature, NORM_EPS, lse.reshape(-1, 2, n),
                                          target_stat.reshape(-1, 2, n), target_logp=logp, t1=u1, t2=u2)
    return dz1.reshape(z1.shape), dz2.reshape(z2.shape)


@_backward_op.register_fake
def _backward_fake(grad_loss, z1, z2, target_logp, t1, t2, temperature, lse, target_stat):
    return torch.empty_like(z1), torch.empty_like(z2)


def _setup_context(ctx, inputs, output):
    z1, z2, target_logp, t1, t2, temperature = inputs
    _, lse, target_stat = output
    ctx.mark_non_differentiable(lse, target_stat)
    ctx.save_for_backward(z1, z2, target_logp, t1, t2, lse, target_stat)
    ctx.temperature = temperature


@once_differentiable  # the backward is itself a custom op without a derivative: no double backward
def _backward(ctx, grad_loss, _grad_lse, _grad_target_stat):
    z1, z2, target_logp, t1, t2, lse, target_stat = ctx.saved_tensors
    dz1, dz2 = _backward_op(grad_loss, z1, z2, target_logp, t1, t2, ctx.temperature, lse, target_stat)
    return dz1, dz2, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _SoftmaxKLFunction(torch.autograd.Function):
    """The forward op with the same backward, as an autograd.Function: custom ops' register_autograd does
    not reach torch.func.grad yet (pytorch/pytorch#170834), and the core takes per-task grads under vmap."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z1, z2, target_logp, t1, t2, temperature):
        return _forward_op(z1, z2, target_logp, t1, t2, temperature)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


@_forward_op.register_vmap
def _forward_vmap(info, in_dims, z1, z2, target_logp, t1, t2, temperature):
    args = batch_to_front(info.batch_size, in_dims, (z1, z2, target_logp, t1, t2))
    return _forward_op(*args, temperature), (0, 0, 0)


@_backward_op.register_vmap
def _backward_vmap(info, in_dims, grad_loss, z1, z2, target_logp, t1, t2, temperature, lse, target_stat):
    args = batch_to_front(info.batch_size, in_dims, (grad_loss, z1, z2, target_logp, t1, t2, temperature, lse,
                                                      target_stat))
    return _backward_op(*args), (0, 0)


def _check_current(z1, z2, temperature):
    check_float_tensor("z1", z1)
    if z1.dim() < 2 or z1.shape[-2] < 1:
        raise ValueError(f"z1 must be [..., N, d] with N >= 1, got {tuple(z1.shape)}")
    check_same_layout("z2", z2, "z1", z1)
    return check_finite_scalar("temperature", temperature, positive=True)


def softmax_kl(z1, z2, target_logp, temperature):
    """Mean KL(p_target || p_current) over the 2N head rows of each task.

    z1, z2: [..., N, d] current embeddings; target_logp: [..., 2, N, N] target log-probabilities
    (see ``pair_log_probs``), treated as a constant. Returns loss [...] in z1's dtype,
    differentiable w.r.t. z1 and z2.
    """
    temperature = _check_current(z1, z2, temperature)
    check_float_tensor("target_logp", target_logp)
    n = z1.shape[-2]
    if target_logp.shape != (*z1.shape[:-2], 2, n, n):
        raise ValueError(f"target_logp must be {(*z1.shape[:-2], 2, n, n)} for z1 {tuple(z1.shape)}, "
                         f"got {tuple(target_logp.shape)}")
    if target_logp.device != z1.device:
        raise ValueError(f"target_logp must be on {z1.device}, got {target_logp.device}")
    return _SoftmaxKLFunction.apply(z1, z2, target_logp.detach(), None, None, temperature)[0]


def softmax_kl_from_embeddings(z1, z2, t1, t2, temperature):
    """``softmax_kl`` with the target head computed from target embeddings t1, t2 [..., N, d] (constants).

    Nothing N x N is stored on the Triton path, so this is the variant for large N.
    """
    temperature = _check_current(z1, z2, temperature)
    check_float_tensor("t1", t1)
    if t1.shape != z1.shape or t1.device != z1.device:
        raise ValueError(f"t1 must match z1 in shape {tuple(z1.shape)} and device {z1.device}, "
                         f"got {tuple(t1.shape)} on {t1.device}")
    check_same_layout("t2", t2, "t1", t1)
    return _SoftmaxKLFunction.apply(z1, z2, None, t1.detach(), t2.detach(), temperature)[0]


def softmax_kl_reference(z1, z2, target_logp, temperature):
    """Plain-PyTorch ``softmax_kl`` (autograd through ordinary ops), for debugging and comparisons."""
    temperature = _check_current(z1, z2, temperature)
    return _reference_forward(z1, z2, target_logp.detach(), None, None, temperature)[0]


def softmax_kl_from_embeddings_reference(z1, z2, t1, t2, temperature):
    """Plain-PyTorch ``softmax_kl_from_embeddings``."""
    return softmax_kl_reference(z1, z2, pair_log_probs(t1.detach(), t2.detach(), temperature), temperature)
