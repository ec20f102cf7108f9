"""gessl_ext.ops.softmax_kl_from_embeddings against an independent plain-PyTorch formula.

CPU tests exercise the op layer (custom op, closed-form backward, fake, vmap, compile); tests marked
``cuda`` run the Triton kernels on a GPU. The Triton source itself is also run on the CPU through the
interpreter in test_softmax_kl_triton.py.
"""
import importlib

import pytest
import torch

from gessl_ext import ops
from ops_testing import RTOL, assert_close_rel, gradient_scale, independent_kl, randn

# the module (gessl_ext.ops.softmax_kl as an attribute is the function of the same name)
softmax_kl_module = importlib.import_module("gessl_ext.ops.softmax_kl")

TAU = 0.5
SHAPES = [(n, d) for n in (2, 3, 17, 64, 300) for d in (1, 5, 128, 257)]


def draw(generator, shape, dtype=torch.float64, device="cpu"):
    return [randn(shape, generator, dtype, device) for _ in range(4)]


@pytest.mark.parametrize("n,d", SHAPES)
def test_forward_matches_independent_formula(generator, n, d):
    z1, z2, t1, t2 = draw(generator, (2, n, d))
    expected = independent_kl(z1, z2, t1, t2, TAU)
    for loss in (ops.softmax_kl_from_embeddings(z1, z2, t1, t2, TAU),
                 ops.softmax_kl_from_embeddings_reference(z1, z2, t1, t2, TAU)):
        assert_close_rel(loss, expected, 1e-10, what=f"loss n={n} d={d}")


@pytest.mark.parametrize("n,d", SHAPES)
def test_closed_form_backward_matches_autograd_of_reference(generator, n, d):
    z1, z2, t1, t2 = draw(generator, (2, n, d))
    weights = randn((2,), generator, torch.float64)
    leaves = [z.clone().requires_grad_() for z in (z1, z2)]
    expected = torch.autograd.grad((independent_kl(*leaves, t1, t2, TAU) * weights).sum(), leaves)
    inputs = [z.clone().requires_grad_() for z in (z1, z2)]
    grads = torch.autograd.grad((ops.softmax_kl_from_embeddings(*inputs, t1, t2, TAU) * weights).sum(), inputs)
    scale = gradient_scale(z1, z2, t1, t2, TAU, weights)
    for got, want, name in zip(grads, expected, ("dz1", "dz2")):
        assert_close_rel(got, want, 1e-9, floor=scale, what=f"{name} n={n} d={d}")


@pytest.mark.parametrize("n,d", [(2, 1), (3, 5), (6, 4)])
def test_gradcheck(generator, n, d):
    z1, z2, t1, t2 = draw(generator, (2, n, d))
    fn = lambda a, b: ops.softmax_kl_from_embeddings(a, b, t1, t2, TAU)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z1.requires_grad_(), z2.requires_grad_()))


def test_zero_row_takes_the_clamped_normalisation(generator):
    z1, z2, t1, t2 = draw(generator, (1, 5, 3))
    z1[0, 2] = 0.0
    leaves = [z.clone().requires_grad_() for z in (z1, z2)]
    expected = torch.autograd.grad(ops.softmax_kl_from_embeddings_reference(*leaves, t1, t2, TAU).sum(), leaves)
    inputs = [z.clone().requires_grad_() for z in (z1, z2)]
    grads = torch.autograd.grad(ops.softmax_kl_from_embeddings(*inputs, t1, t2, TAU).sum(), inputs)
    assert expected[0][0, 2].abs().sum() > 0  # the clamped row still receives gradient (1/eps scaling)
    for got, want in zip(grads, expected):
        assert_close_rel(got, want, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_against_float64(generator, dtype):
    z1, z2, t1, t2 = draw(generator, (3, 17, 5), dtype)
    weights = randn((3,), generator, torch.float64)
    wide = [z.to(torch.float64).requires_grad_() for z in (z1, z2)]
    want_loss = ops.softmax_kl_from_embeddings_reference(*wide, t1.double(), t2.double(), TAU)
    want = torch.autograd.grad((want_loss * weights).sum(), wide)
    inputs = [z.clone().requires_grad_() for z in (z1, z2)]
    loss = ops.softmax_kl_from_embeddings(*inputs, t1, t2, TAU)
    assert loss.dtype == dtype
    grads = torch.autograd.grad((loss * weights.to(dtype)).sum(), inputs)
    assert_close_rel(loss, want_loss, RTOL[dtype], what="loss")
    for got, expected in zip(grads, want):
        assert got.dtype == dtype
        assert_close_rel(got, expected, RTOL[dtype], what="grad")


def test_leading_task_dims_and_vmap(generator):
    z1, z2, t1, t2 = draw(generator, (2, 3, 6, 4))
    batched = ops.softmax_kl_from_embeddings(z1, z2, t1, t2, TAU)
    assert batched.shape == (2, 3)
    flat = ops.softmax_kl_from_embeddings(*(t.reshape(6, 6, 4) for t in (z1, z2, t1, t2)), TAU)
    assert_close_rel(batched.reshape(6), flat, 1e-12)
    per_task = torch.func.vmap(ops.softmax_kl_from_embeddings, in_dims=(0, 0, 0, 0, None))
    assert_close_rel(per_task(z1, z2, t1, t2, TAU), batched, 1e-12)
    # unbatched (shared) target through vmap
    shared = torch.func.vmap(ops.softmax_kl_from_embeddings, in_dims=(0, 0, None, None, None))(
        z1[0], z2[0], t1[0, 0], t2[0, 0], TAU)
    expected = ops.softmax_kl_from_embeddings(z1[0], z2[0], t1[0, :1].expand(3, 6, 4), t2[0, :1].expand(3, 6, 4), TAU)
    assert_close_rel(shared, expected, 1e-12)


def test_vmap_of_grad_matches_batched_gradient(generator):
    """The core's pattern: per-task grad inside vmap over tasks."""
    z1, z2, t1, t2 = draw(generator, (4, 9, 3))
    loss_fn = lambda a, b, u, v: ops.softmax_kl_from_embeddings(a, b, u, v, TAU)  # noqa: E731
    per_task = torch.func.vmap(torch.func.grad(loss_fn, argnums=(0, 1)))(z1, z2, t1, t2)
    leaves = [z.clone().requires_grad_() for z in (z1, z2)]
    expected = torch.autograd.grad(ops.softmax_kl_from_embeddings_reference(*leaves, t1, t2, TAU).sum(), leaves)
    for got, want in zip(per_task, expected):
        assert_close_rel(got, want, 1e-9)


def test_compiles_without_graph_breaks(generator):
    z1, z2, t1, t2 = draw(generator, (2, 5, 3), torch.float32)
    compiled = torch.compile(ops.softmax_kl_from_embeddings, backend="aot_eager", fullgraph=True)
    leaves = [z.clone().requires_grad_() for z in (z1, z2)]
    loss = compiled(*leaves, t1, t2, TAU)
    grads = torch.autograd.grad(loss.sum(), leaves)
    eager = [z.clone().requires_grad_() for z in (z1, z2)]
    want = ops.softmax_kl_from_embeddings(*eager, t1, t2, TAU)
    assert_close_rel(loss, want, 1e-6)
    for got, expected in zip(grads, torch.autograd.grad(want.sum(), eager)):
        assert_close_rel(got, expected, 1e-6)


def test_opcheck(generator):
    z1, z2, t1, t2 = draw(generator, (2, 6, 3))
    z1.requires_grad_()
    z2.requires_grad_()
    torch.library.opcheck(softmax_kl_module._forward_op, (z1, z2, t1, t2, TAU))
    _, lse, target_lse = softmax_kl_module._forward_op(z1, z2, t1, t2, TAU)
    grad = randn((2,), generator, torch.float64)
    torch.library.opcheck(softmax_kl_module._backward_op,
                          (grad, z1.detach(), z2.detach(), t1, t2, TAU, lse, target_lse))


def test_double_backward_raises(generator):
    z1, z2, t1, t2 = draw(generator, (1, 4, 3))
    z1.requires_grad_()
    (grad,) = torch.autograd.grad(ops.softmax_kl_from_embeddings(z1, z2, t1, t2, TAU).sum(), z1, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), z1)


def test_targets_receive_no_gradient(generator):
    z1, z2, t1, t2 = (z.requires_grad_() for z in draw(generator, (1, 4, 3)))
    ops.softmax_kl_from_embeddings(z1, z2, t1, t2, TAU).sum().backward()
    assert t1.grad is None and t2.grad is None and z1.grad is not None


def test_bad_inputs_raise(generator):
    z1, z2, t1, t2 = draw(generator, (2, 4, 3))
    with pytest.raises(ValueError, match="z2 must have the shape"):
        ops.softmax_kl_from_embeddings(z1, z2[:, :3], t1, t2, TAU)
    with pytest.raises(ValueError, match="temperature"):
        ops.softmax_kl_from_embeddings(z1, z2, t1, t2, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        ops.softmax_kl_from_embeddings_reference(z1, z2, t1, t2, float("nan"))
    with pytest.raises(TypeError, match="floating dtype"):
        ops.softmax_kl_from_embeddings(z1.long(), z2.long(), t1, t2, TAU)
    with pytest.raises(TypeError, match="dtype of z1"):
        ops.softmax_kl_from_embeddings(z1, z2.float(), t1, t2, TAU)
    with pytest.raises(ValueError, match="t1 must match z1"):
        ops.softmax_kl_from_embeddings(z1, z2, t1[:, :3], t2, TAU)
    with pytest.raises(ValueError, match="t2 must have the shape"):
        ops.softmax_kl_from_embeddings(z1, z2, t1, t2[:, :3], TAU)
    with pytest.raises(ValueError, match=r"\[..., N, d\]"):
        ops.softmax_kl_from_embeddings(z1[0, 0], z2[0, 0], t1[0, 0], t2[0, 0], TAU)


# ---------------------------------------------------------------- GPU: the Triton kernels themselves


def _kernel():
    module, reason = softmax_kl_module.triton_kernel("softmax_kl")
    if module is None:
        pytest.skip(reason)
    return module


# Time budget of the CUDA-marked tests (all in tests/ops; bench/gpu_check.sh's tests_cuda stage, capped at
# 120 s): 60 s for `pytest tests -m cuda` on one H200. Most of it is Triton compiling a forward and a
# backward kernel per padded width and dtype (here 16, 128, 512 x fp32, bf16, plus 32 x fp32 below: 14
# kernels); on 2026-11-30, 84 cases with 32 compilations took 42 s, these are 15 cases. The C++ ops'
# 114 CUDA cases (test_fd_hvp.py) compile nothing and take a few seconds. The CPU tests above cover the
# op layer on the full shape grid; test_softmax_kl_triton.py runs this Triton source in the interpreter.
CUDA_SHAPES = [(2, 1), (300, 1), (17, 5), (64, 128), (3, 257), (300, 257)]


@pytest.mark.cuda
@pytest.mark.parametrize("n,d", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference(generator, n, d, dtype):
    _kernel()
    z1, z2, t1, t2 = draw(generator, (3, n, d), dtype, "cuda")
    weights = randn((3,), generator, torch.float64, "cuda")
    wide = [z.double().requires_grad_() for z in (z1, z2)]
    want_loss = ops.softmax_kl_from_embeddings_reference(*wide, t1.double(), t2.double(), TAU)
    want = torch.autograd.grad((want_loss * weights).sum(), wide)
    inputs = [z.clone().requires_grad_() for z in (z1, z2)]
    loss = ops.softmax_kl_from_embeddings(*inputs, t1, t2, TAU)
    grads = torch.autograd.grad((loss * weights.to(dtype)).sum(), inputs)
    assert_close_rel(loss, want_loss, RTOL[dtype], what="loss")
    scale = gradient_scale(z1, z2, t1, t2, TAU, weights)
    for got, expected in zip(grads, want):
        assert_close_rel(got, expected, RTOL[dtype], floor=scale, what="grad")


@pytest.mark.cuda
def test_cuda_launchers_write_every_output(generator):
    """The launchers preallocate NaN; after a run every element must be finite (written)."""
    kernel = _kernel()
    z1, z2, t1, t2 = draw(generator, (2, 37, 19), torch.float32, "cuda")
    loss, lse, target_lse = kernel.softmax_kl_forward(z1, z2, t1, t2, TAU, softmax_kl_module.NORM_EPS)
    dz1, dz2 = kernel.softmax_kl_backward(torch.ones(2, device="cuda"), z1, z2, t1, t2, TAU,
                                          softmax_kl_module.NORM_EPS, lse, target_lse)
    for name, t in dict(loss=loss, lse=lse, target_lse=target_lse, dz1=dz1, dz2=dz2).items():
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


@pytest.mark.cuda
def test_cuda_large_n_keeps_memory_linear(generator):
    """N = 4096 forward + backward: peak extra memory stays far below one N x N fp32 buffer per task."""
    _kernel()
    m, n, d = 2, 4096, 128
    z1, z2, t1, t2 = draw(generator, (m, n, d), torch.float32, "cuda")
    z1.requires_grad_()
    z2.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    ops.softmax_kl_from_embeddings(z1, z2, t1, t2, TAU).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    assert extra < m * n * n * 4 / 8, f"peak extra memory {extra} bytes looks N x N"


@pytest.mark.cuda
def test_cuda_opcheck(generator):
    _kernel()
    z1, z2, t1, t2 = draw(generator, (2, 20, 7), torch.float32, "cuda")
    torch.library.opcheck(softmax_kl_module._forward_op, (z1.requires_grad_(), z2.requires_grad_(), t1, t2, TAU))
