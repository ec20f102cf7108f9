"""gessl_ext.ops.task_sgd against the explicit step; gradients by gradcheck; CUDA kernel (marker ``cuda``)
against the PyTorch reference with NaN-poisoned outputs."""
import pytest
import torch

from gessl_ext import ops
from gessl_ext.ops import _backends
from ops_testing import RTOL, assert_close_rel, randn


@pytest.mark.parametrize("rows", [(), (4,), (2, 3)])
@pytest.mark.parametrize("p", [1, 9, 1000])
def test_matches_explicit_step_and_norm(generator, rows, p):
    theta, grad = randn((*rows, p), generator, torch.float64), randn((*rows, p), generator, torch.float64)
    stepped, norm = ops.task_sgd(theta, grad, 0.05, return_norm=True)
    assert_close_rel(stepped, theta - 0.05 * grad, 1e-15)
    assert norm.shape == rows
    assert_close_rel(norm, (grad * grad).sum(-1).sqrt(), 1e-14)
    only_step = ops.task_sgd(theta, grad, 0.05)
    assert isinstance(only_step, torch.Tensor)
    assert torch.equal(only_step, stepped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_float64(generator, dtype):
    theta, grad = randn((3, 333), generator, dtype), randn((3, 333), generator, dtype)
    stepped, norm = ops.task_sgd(theta, grad, 0.1, return_norm=True)
    assert stepped.dtype == dtype and norm.dtype == torch.float32
    assert_close_rel(stepped, theta.double() - 0.1 * grad.double(), RTOL[dtype])
    assert_close_rel(norm, grad.double().norm(dim=-1), RTOL[dtype])


@pytest.mark.parametrize("return_norm", [False, True])
def test_gradcheck(generator, return_norm):
    theta, grad = randn((3, 5), generator, torch.float64), randn((3, 5), generator, torch.float64)

    def step(t, g):
        return ops.task_sgd(t, g, 0.3, return_norm=return_norm)

    assert torch.autograd.gradcheck(step, (theta.requires_grad_(), grad.requires_grad_()))
    assert torch.autograd.gradgradcheck(step, (theta, grad))


def test_norm_gradient_is_zero_for_a_zero_gradient_row(generator):
    theta = randn((2, 4), generator, torch.float64)
    grad = torch.zeros(2, 4, dtype=torch.float64)
    grad[1] = randn((4,), generator, torch.float64)
    grad.requires_grad_()
    _, norm = ops.task_sgd(theta, grad, 0.1, return_norm=True)
    (d_grad,) = torch.autograd.grad(norm.sum(), grad)
    assert torch.equal(d_grad[0], torch.zeros(4, dtype=torch.float64))
    assert_close_rel(d_grad[1], grad[1].detach() / grad[1].detach().norm(), 1e-14)


def test_vmap_and_per_task_grad(generator):
    """vmap over tasks, and the itd pattern: grad through a vmapped inner step."""
    theta, grad = randn((4, 6), generator, torch.float64), randn((4, 6), generator, torch.float64)
    mapped, mapped_norm = torch.func.vmap(ops.task_sgd, in_dims=(0, 0, None, None))(theta, grad, 0.2, True)
    stepped, norm = ops.task_sgd(theta, grad, 0.2, return_norm=True)
    assert_close_rel(mapped, stepped, 1e-15)
    assert_close_rel(mapped_norm, norm, 1e-15)
    assert_close_rel(torch.func.vmap(ops.task_sgd, in_dims=(0, 0, None))(theta, grad, 0.2), stepped, 1e-15)

    def inner_loss(t):  # loss after one step with the gradient of 1/2 ||t||^2
        return (ops.task_sgd(t, t, 0.2) ** 2).sum()

    per_task = torch.func.vmap(torch.func.grad(inner_loss))(theta)
    assert_close_rel(per_task, 2 * (1 - 0.2) ** 2 * theta, 1e-14)


@pytest.mark.parametrize("return_norm", [False, True])
def test_opcheck(generator, return_norm):
    theta, grad = randn((3, 7), generator).requires_grad_(), randn((3, 7), generator).requires_grad_()
    torch.library.opcheck(torch.ops.gessl_ext.task_sgd.default, (theta, grad, 0.1, return_norm))


def test_bad_inputs_raise(generator):
    theta = randn((2, 4), generator)
    with pytest.raises(ValueError, match="grad must have the shape"):
        ops.task_sgd(theta, theta[:, :2], 0.1)
    with pytest.raises(ValueError, match="lr must be finite"):
        ops.task_sgd(theta, theta, float("nan"))
    with pytest.raises(TypeError, match="floating dtype"):
        ops.task_sgd(theta.int(), theta.int(), 0.1)


# ---------------------------------------------------------------- GPU: the CUDA kernel itself


@pytest.mark.cuda
@pytest.mark.parametrize("p", [1, 3, 8, 1023, 1025, 12289, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_cuda_kernel_matches_reference(generator, p, dtype, rows, offset):
    if _backends.EXTENSION is None:
        pytest.skip(_backends.EXTENSION_ERROR)

    def draw():
        return randn((rows * p + offset,), generator, dtype, "cuda")[offset:].view(rows, p)

    theta, grad = draw(), draw()
    want_step, want_norm = ops.task_sgd_reference(theta, grad, 0.07, return_norm=True)
    for return_norm in (False, True):
        stepped, norm = _backends.EXTENSION.task_sgd(theta, grad, 0.07, return_norm, poison=True)
        assert_close_rel(stepped, want_step, RTOL[dtype], what="step")
        if return_norm:
            assert norm.dtype == want_norm.dtype
            assert_close_rel(norm, want_norm, RTOL[dtype], what="norm")
        else:
            assert norm.numel() == 0


@pytest.mark.cuda
def test_cuda_public_op_and_opcheck(generator):
    if _backends.EXTENSION is None:
        pytest.skip(_backends.EXTENSION_ERROR)
    theta, grad = randn((2, 3, 50), generator, device="cuda"), randn((2, 3, 50), generator, device="cuda")
    stepped, norm = ops.task_sgd(theta, grad, 0.1, return_norm=True)
    assert stepped.shape == theta.shape and norm.shape == (2, 3)
    assert_close_rel(stepped, theta.double() - 0.1 * grad.double(), RTOL[torch.float32])
    assert_close_rel(norm, grad.double().norm(dim=-1), RTOL[torch.float32])
    torch.library.opcheck(torch.ops.gessl_ext.task_sgd.default,
                          (theta.requires_grad_(), grad.requires_grad_(), 0.1, True))
