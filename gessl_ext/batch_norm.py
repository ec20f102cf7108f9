"""Batch / instance normalisation with input statistics whose first two reverse-mode derivatives batch under vmap.

``itd`` with tasks batched differentiates a gradient pass in reverse mode (a ``torch.func.vjp`` over the pass's own
pullback). torch's fused BatchNorm double backward has no batching rule, and the same function from elementary ops
keeps, for that second derivative, the centred input and the partial sums of its gradient: about 1.5 more
activation-sized tensors per layer (bench/bench_memory.py). :func:`normalize` is one custom function whose
backward is a second custom function with the analytic second derivative, so the outer derivative keeps only the
layer's input x and the gradient reaching it — what any layer's double backward needs.

Reverse mode only, twice: a forward-mode product raises an error that says so (``hvp`` and the other
forward-over-reverse methods use torch's kernels), and a third reverse derivative fails on the second one's in-place
temporaries, where torch's own BatchNorm refuses one too.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, dims: list[int]) -> Tensor:
    """y = (x − μ) / √(σ² + ε) · w + b with the mean μ and biased variance σ² of x over ``dims``.

    x: [B, C, *spatial], any floating dtype; weight, bias: broadcastable to the statistics ([1, C, 1, …]) or None
    (w = 1, b = 0). ``dims``: the reduced axes — [0, 2, …] for BatchNorm (per channel), [2, …] for InstanceNorm (per
    sample and channel). Same values as ``torch.nn.functional.batch_norm`` / ``instance_norm`` with
    ``training=True``; differentiable twice in reverse mode, also under ``torch.func.vmap``.
    """
    return _Normalize.apply(x, weight, bias, eps, tuple(dims))[0]


def affine_normalize(x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = x·s + (b − μ·s), s = w·r: x normalised with given statistics (mean μ, r = 1 / √(σ² + ε), broadcastable
    to x), as torch's CPU kernel computes it, so that a backward keeps x but neither the centred nor the normalised
    input. Plain torch ops: any transform (:func:`gessl_ext.layers._plain_norm` runs it under forward mode too)."""
    scale = _scale(weight, rstd)
    shift = -mean * scale if bias is None else bias - mean * scale
    return (x * scale).add_(shift)


def _scale(weight, rstd):
    return rstd if weight is None else weight * rstd


def _mean(t: Tensor, dims) -> Tensor:
    return t.mean(dims, keepdim=True)


def _no_forward_mode(ctx, *tangents):
    raise RuntimeError("gessl_ext.batch_norm.normalize, which BatchNorm / InstanceNorm run as in the vmapped passes of "
                       "a hypergradient method with differentiates_inner_loop = True, has no forward-mode rule; take "
                       "Hessian-vector products with problem.hvp (it runs torch's kernels) instead of torch.func.jvp "
                       "through problem.grad, problem.update or problem.unroll")


class _Normalize(torch.autograd.Function):
    """y = x·s + (b − μs), s = w / √(σ² + ε): x is the only activation-sized tensor kept for the backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps, dims):
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        return affine_normalize(x, mean, rstd, weight, bias), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _, dims = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.dims, ctx.has_bias = dims, bias is not None

    jvp = staticmethod(_no_forward_mode)

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _NormalizeBackward.apply(grad_y, x, weight, mean, rstd, ctx.dims)
        return (grad_x, grad_weight if weight is not None else None, grad_bias if ctx.has_bias else None, None, None)


class _NormalizeBackward(torch.autograd.Function):
    """(∂/∂x, ∂/∂w, ∂/∂b) of Σ g·y for the upstream gradient g, x̂ = (x − μ)·r, r = 1 / √(σ² + ε), means over the
    reduced axes (n elements each):

    gb = Σ g, gw = Σ g·x̂, gx = w·r·(g − mean g − x̂·mean(g·x̂)).

    Its own backward, for cotangents (hx, hw, hb), with q = g − mean g − x̂·mean(g·x̂):

    ∂/∂g = hb + hw·x̂ + w·r·(hx − mean hx − x̂·mean(hx·x̂)) (the same projection, self-adjoint);
    ∂/∂w = r·Σ hx·q;
    ∂/∂x = r·(c − mean c − x̂·mean(x̂·c)) − (r²·w·Σ hx·q / n)·x̂, where c = hw·g − w·r·(mean(g·x̂)·hx + mean(hx·x̂)·g)
    is the cotangent of x̂ and the last term that of r in gx's factor w·r.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, x, weight, mean, rstd, dims):
        x_hat = (x - mean).mul_(rstd)
        grad_bias = grad_y.sum(dims, keepdim=True)
        grad_weight = (grad_y * x_hat).sum(dims, keepdim=True)
        n = x.numel() // mean.numel()
        grad_x = x_hat.mul_(-grad_weight / n).add_(grad_y).sub_(grad_bias / n).mul_(_scale(weight, rstd))
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, weight, mean, rstd, dims = inputs
        ctx.save_for_backward(grad_y, x, weight, mean, rstd)
        ctx.dims = dims

    jvp = staticmethod(_no_forward_mode)

    @staticmethod
    def backward(ctx, h_x, h_weight, h_bias):
        # Four activation-sized temporaries at a time besides the inputs: x̂, ∂/∂g and c, written in place, and one
        # product on its way into them.
        grad_y, x, weight, mean, rstd = ctx.saved_tensors
        dims = ctx.dims
        n = x.numel() // mean.numel()
        x_hat = (x - mean).mul_(rstd)
        scale = _scale(weight, rstd)
        g_x_hat, h_x_hat = _mean(grad_y * x_hat, dims), _mean(h_x * x_hat, dims)
        # Σ hx·q = Σ hx·g − Σ hx · mean g − Σ hx·x̂ · mean(g·x̂), without forming q
        h_q = (h_x * grad_y).sum(dims, keepdim=True) - n * (_mean(h_x, dims) * _mean(grad_y, dims) + h_x_hat * g_x_hat)
        grad_grad_y = (h_x - _mean(h_x, dims)).sub_(x_hat * h_x_hat).mul_(scale)
        c = grad_y * (-scale * h_x_hat)
        if h_bias is not None:
            grad_grad_y.add_(h_bias)
        if h_weight is not None:
            grad_grad_y.add_(x_hat * h_weight)
            c.add_(grad_y * h_weight)
        c.sub_(h_x * (scale * g_x_hat))
        grad_x = c.sub_(_mean(c, dims)).sub_(x_hat * (_mean(x_hat * c, dims) + scale * h_q / n)).mul_(rstd)
        grad_weight = None if weight is None else rstd * h_q
        return grad_grad_y, grad_x, grad_weight, None, None, None
