"""Pair-classification head pi and its KL outer loss, as custom ops (Triton on CUDA, PyTorch elsewhere).

Head (per task): z1, z2 [N, d]; S = cos(z1_i, z2_k) / tau. View-1 row i predicts softmax_k(S[i, :]),
view-2 row k predicts softmax_i(S[:, k]). The outer loss of a task (Eq. 3) is the mean over the 2N rows
of KL(p_target || p_current), where the target head is computed with the same formula from the target
embeddings t1, t2. Targets are constants: no gradient flows into them.

All leading dims are tasks: z1, z2 [..., N, d] -> loss [...]. The custom ops are the pair
``gessl_ext::softmax_kl_forward`` (loss plus O(N) row statistics kept for the backward) and
``gessl_ext::softmax_kl_backward``; on CUDA both run the tile-wise Triton kernels in
kernels/softmax_kl.py (fp16/bf16/fp32; float64 uses the PyTorch path), elsewhere the PyTorch
implementation below, whose backward is the same closed form the kernel evaluates.
"""
import math

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


def _reference_forward(z1, z2, t1, t2, temperature):
    """Plain-PyTorch forward: (loss [...] in z1's dtype, lse [..., 2, N], target_lse [..., 2, N]).

    The row log-sum-exps of the current and the target head are in the accumulation dtype.
    """
    logp, lse = _head_log_probs(pair_logits(z1, z2, temperature))
    target, target_lse = _head_log_probs(pair_logits(t1, t2, temperature).to(logp.dtype))
    kl_rows = (target.exp() * (target - logp)).sum(-1)
    return kl_rows.mean(dim=(-2, -1)).to(z1.dtype), lse, target_lse


def _reference_backward(grad_loss, z1, z2, t1, t2, temperature, lse, target_lse):
    """Closed-form gradient (dz1, dz2) of the loss, as the Triton backward evaluates it (see kernels/softmax_kl.py)."""
    compute = lse.dtype
    x, y = z1.to(compute), z2.to(compute)
    x_norm, y_norm = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
    a, b = x / x_norm.clamp_min(NORM_EPS), y / y_norm.clamp_min(NORM_EPS)
    logits = a @ b.mT / temperature
    target_logits = pair_logits(t1, t2, temperature).to(compute)
    g = (logits - lse[..., 0, :, None]).exp() + (logits - lse[..., 1, None, :]).exp() \
        - (target_logits - target_lse[..., 0, :, None]).exp() - (target_logits - target_lse[..., 1, None, :]).exp()
    g = g * (grad_loss.to(compute) / (2 * z1.shape[-2]))[..., None, None]
    grad_a, grad_b = g @ b / temperature, g.mT @ a / temperature

    def through_normalize(unit, norm, grad_unit):
        radial = unit * (unit * grad_unit).sum(-1, keepdim=True)
        return torch.where(norm > NORM_EPS, grad_unit - radial, grad_unit) / norm.clamp_min(NORM_EPS)

    return through_normalize(a, x_norm, grad_a).to(z1.dtype), through_normalize(b, y_norm, grad_b).to(z2.dtype)


def _triton_launcher(z1, t1):
    """The Triton kernel module when it can take these inputs, else None."""
    kernel, _ = triton_kernel("softmax_kl")
    if kernel is None or z1.numel() == 0 or math.prod(z1.shape[:-2]) > kernel.MAX_TASKS \
            or z1.shape[-1] > kernel.MAX_FEATURES:
        return None
    if any(t.dtype not in kernel.SUPPORTED_DTYPES for t in (z1, t1)):
        return None
    return kernel


def _as_task_batch(*embeddings):
    """Flattens the leading task dims of each [..., N, d] tensor: -> [B, N, d]."""
    return [t.reshape(-1, *t.shape[-2:]) for t in embeddings]


@torch.library.custom_op("gessl_ext::softmax_kl_forward", mutates_args=())
def _forward_op(z1: Tensor, z2: Tensor, t1: Tensor, t2: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    return _reference_forward(z1, z2, t1, t2, temperature)


@_forward_op.register_kernel("cuda")
def _forward_cuda(z1, z2, t1, t2, temperature):
    kernel = _triton_launcher(z1, t1)
    if kernel is None:
        return _reference_forward(z1, z2, t1, t2, temperature)
    loss, lse, target_lse = kernel.softmax_kl_forward(*_as_task_batch(z1, z2, t1, t2), temperature, NORM_EPS)
    stat_shape = (*z1.shape[:-2], 2, z1.shape[-2])
    return loss.to(z1.dtype).reshape(z1.shape[:-2]), lse.reshape(stat_shape), target_lse.reshape(stat_shape)


@_forward_op.register_fake
def _forward_fake(z1, z2, t1, t2, temperature):
    stat_shape = (*z1.shape[:-2], 2, z1.shape[-2])
    stat_dtype = accumulation_dtype(z1.dtype)
    return (z1.new_empty(z1.shape[:-2]), z1.new_empty(stat_shape, dtype=stat_dtype),
            z1.new_empty(stat_shape, dtype=stat_dtype))


@torch.library.custom_op("gessl_ext::softmax_kl_backward", mutates_args=())
def _backward_op(grad_loss: Tensor, z1: Tensor, z2: Tensor, t1: Tensor, t2: Tensor, temperature: float, lse: Tensor,
                 target_lse: Tensor) -> tuple[Tensor, Tensor]:
    return _reference_backward(grad_loss, z1, z2, t1, t2, temperature, lse, target_lse)


@_backward_op.register_kernel("cuda")
def _backward_cuda(grad_loss, z1, z2, t1, t2, temperature, lse, target_lse):
    kernel = _triton_launcher(z1, t1)
    if kernel is None:
        return _reference_backward(grad_loss, z1, z2, t1, t2, temperature, lse, target_lse)
    n = z1.shape[-2]
    dz1, dz2 = kernel.softmax_kl_backward(grad_loss.reshape(-1), *_as_task_batch(z1, z2, t1, t2), temperature,
                                          NORM_EPS, lse.reshape(-1, 2, n), target_lse.reshape(-1, 2, n))
    return dz1.reshape(z1.shape), dz2.reshape(z2.shape)


@_backward_op.register_fake
def _backward_fake(grad_loss, z1, z2, t1, t2, temperature, lse, target_lse):
    return torch.empty_like(z1), torch.empty_like(z2)


def _setup_context(ctx, inputs, output):
    z1, z2, t1, t2, temperature = inputs
    _, lse, target_lse = output
    ctx.mark_non_differentiable(lse, target_lse)
    ctx.save_for_backward(z1, z2, t1, t2, lse, target_lse)
    ctx.temperature = temperature


@once_differentiable  # the backward is itself a custom op without a derivative: no double backward
def _backward(ctx, grad_loss, _grad_lse, _grad_target_lse):
    z1, z2, t1, t2, lse, target_lse = ctx.saved_tensors
    dz1, dz2 = _backward_op(grad_loss, z1, z2, t1, t2, ctx.temperature, lse, target_lse)
    return dz1, dz2, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _SoftmaxKLFunction(torch.autograd.Function):
    """The forward op with the same backward, as an autograd.Function: custom ops' register_autograd does
    not reach torch.func.grad yet (pytorch/pytorch#170834), and the core takes per-task grads under vmap."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z1, z2, t1, t2, temperature):
        return _forward_op(z1, z2, t1, t2, temperature)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


@_forward_op.register_vmap
def _forward_vmap(info, in_dims, z1, z2, t1, t2, temperature):
    args = batch_to_front(info.batch_size, in_dims, (z1, z2, t1, t2))
    return _forward_op(*args, temperature), (0, 0, 0)


@_backward_op.register_vmap
def _backward_vmap(info, in_dims, grad_loss, z1, z2, t1, t2, temperature, lse, target_lse):
    args = batch_to_front(info.batch_size, in_dims, (grad_loss, z1, z2, t1, t2, temperature, lse, target_lse))
    return _backward_op(*args), (0, 0)


def softmax_kl_from_embeddings(z1, z2, t1, t2, temperature):
    """Mean KL(p_target || p_current) over the 2N head rows of each task (Eq. 3 with the pair head pi).

    z1, z2: [..., N, d] current embeddings (fp16 / bf16 / fp32 / fp64; every leading dim is a task);
    t1, t2: target embeddings of the same shape, dtype and device, treated as constants.
    temperature: the head's tau > 0. Returns loss [...] in z1's dtype, differentiable w.r.t. z1 and z2
    (once: no double backward). Nothing N x N is stored on the Triton path (CUDA, d <= 512, fp16 /
    bf16 / fp32), so large N costs O(N d) memory; elsewhere the PyTorch implementation runs.
    Raises TypeError / ValueError naming the argument for non-float, mismatched or misplaced inputs.
    """
    temperature = _check_inputs(z1, z2, t1, t2, temperature)
    return _SoftmaxKLFunction.apply(z1, z2, t1.detach(), t2.detach(), temperature)[0]


def softmax_kl_from_embeddings_reference(z1, z2, t1, t2, temperature):
    """Plain-PyTorch ``softmax_kl_from_embeddings`` (autograd through ordinary ops), for debugging and comparisons."""
    temperature = _check_inputs(z1, z2, t1, t2, temperature)
    return _reference_forward(z1, z2, t1.detach(), t2.detach(), temperature)[0]


def _check_inputs(z1, z2, t1, t2, temperature):
    """Raises before anything runs when the inputs do not fit; returns temperature as a float."""
    check_float_tensor("z1", z1)
    if z1.dim() < 2 or z1.shape[-2] < 1:
        raise ValueError(f"z1 must be [..., N, d] with N >= 1, got {tuple(z1.shape)}")
    check_same_layout("z2", z2, "z1", z1)
    temperature = check_finite_scalar("temperature", temperature, positive=True)
    check_float_tensor("t1", t1)
    if t1.shape != z1.shape or t1.device != z1.device:
        raise ValueError(f"t1 must match z1 in shape {tuple(z1.shape)} and device {z1.device}, "
                         f"got {tuple(t1.shape)} on {t1.device}")
    check_same_layout("t2", t2, "t1", t1)
    return temperature
