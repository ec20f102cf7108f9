"""gessl_ext.ops.fd_perturb / fd_update against explicit formulas; CUDA kernels (marker ``cuda``) against
the PyTorch reference with NaN-poisoned outputs."""
import math

import pytest
import torch

from gessl_ext import ops
from gessl_ext.ops import _backends
from ops_testing import RTOL, assert_close_rel, randn

ROW_SHAPES = [(), (3,), (2, 3)]
SIZES = [1, 7, 1000]


def explicit_perturb(theta, u, radius):
    """Row by row with math.sqrt, float64."""
    rows_theta, rows_u = theta.reshape(-1, theta.shape[-1]), u.reshape(-1, u.shape[-1])
    plus, minus, eps = [], [], []
    for t, d in zip(rows_theta.tolist(), rows_u.tolist()):
        e = radius / max(math.sqrt(sum(v * v for v in d)), torch.finfo(torch.float64).tiny)
        plus.append([a + e * b for a, b in zip(t, d)])
        minus.append([a - e * b for a, b in zip(t, d)])
        eps.append(e)
    as_tensor = lambda values, shape: torch.tensor(values, dtype=torch.float64).reshape(shape)  # noqa: E731
    return as_tensor(plus, theta.shape), as_tensor(minus, theta.shape), as_tensor(eps, theta.shape[:-1])


@pytest.mark.parametrize("rows", ROW_SHAPES)
@pytest.mark.parametrize("p", SIZES)
def test_fd_perturb_matches_explicit_formula(generator, rows, p):
    theta, u = randn((*rows, p), generator), randn((*rows, p), generator)
    theta, u = theta.double(), u.double()
    got = ops.fd_perturb(theta, u, 0.01)
    for g, want, name in zip(got, explicit_perturb(theta, u, 0.01), ("theta_plus", "theta_minus", "eps")):
        assert g.shape == want.shape and g.dtype == torch.float64
        assert_close_rel(g, want, 1e-12, what=name)


@pytest.mark.parametrize("rows", ROW_SHAPES)
def test_fd_update_matches_explicit_formula(generator, rows):
    u, g_plus, g_minus = (randn((*rows, 11), generator, torch.float64) for _ in range(3))
    eps = randn(rows, generator, torch.float64).abs() + 0.1
    got = ops.fd_update(u, g_plus, g_minus, eps, 0.3)
    want = u - 0.3 * (g_plus - g_minus) / (2 * eps[..., None])
    assert_close_rel(got, want, 1e-12)
    shared = ops.fd_update(u, g_plus, g_minus, torch.tensor(0.5, dtype=torch.float64), 0.3)
    assert_close_rel(shared, u - 0.3 * (g_plus - g_minus), 1e-12)


def test_central_difference_recovers_the_hessian_product_of_a_quadratic(generator):
    """f(theta) = 1/2 theta^T A theta per task: (g(theta+eps u) - g(theta-eps u)) / 2 eps = A u exactly."""
    m, p = 3, 8
    a = randn((m, p, p), generator, torch.float64)
    hessian = a @ a.mT
    theta, u = randn((m, p), generator, torch.float64), randn((m, p), generator, torch.float64)
    theta_plus, theta_minus, eps = ops.fd_perturb(theta, u, 1e-3)
    gradient = lambda t: (hessian @ t[..., None])[..., 0]  # noqa: E731
    updated = ops.fd_update(u, gradient(theta_plus), gradient(theta_minus), eps, 0.1)
    assert_close_rel(updated, u - 0.1 * (hessian @ u[..., None])[..., 0], 1e-9)


def test_zero_direction_gives_unperturbed_copies(generator):
    theta = randn((2, 5), generator)
    u = torch.zeros(2, 5)
    u[1] = randn((5,), generator)
    theta_plus, theta_minus, eps = ops.fd_perturb(theta, u, 0.01)
    assert torch.equal(theta_plus[0], theta[0]) and torch.equal(theta_minus[0], theta[0])
    assert eps[0].item() == pytest.approx(0.01 / torch.finfo(torch.float32).tiny, rel=1e-6)
    assert eps[1].item() == pytest.approx(0.01 / u[1].double().norm().item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64(generator, dtype):
    theta, u = randn((3, 257), generator, dtype), randn((3, 257), generator, dtype)
    theta_plus, theta_minus, eps = ops.fd_perturb(theta, u, 0.5)
    assert theta_plus.dtype == dtype and eps.dtype == torch.float32
    want = explicit_perturb(theta.double(), u.double(), 0.5)
    for got, expected in zip((theta_plus, theta_minus, eps), want):
        assert_close_rel(got, expected, RTOL[dtype])
    g_plus, g_minus = randn((3, 257), generator, dtype), randn((3, 257), generator, dtype)
    updated = ops.fd_update(u, g_plus, g_minus, eps, 0.2)
    expected = u.double() - 0.2 * (g_plus.double() - g_minus.double()) / (2 * eps.double()[:, None])
    assert updated.dtype == dtype
    assert_close_rel(updated, expected, RTOL[dtype])


def test_vmap_over_tasks(generator):
    theta, u = randn((4, 9), generator, torch.float64), randn((4, 9), generator, torch.float64)
    batched = ops.fd_perturb(theta, u, 0.01)
    mapped = torch.func.vmap(ops.fd_perturb, in_dims=(0, 0, None))(theta, u, 0.01)
    for a, b in zip(mapped, batched):
        assert_close_rel(a, b, 1e-15)
    shared_u = torch.func.vmap(ops.fd_perturb, in_dims=(0, None, None))(theta, u[0], 0.01)
    for a, b in zip(shared_u, ops.fd_perturb(theta, u[:1].expand(4, 9), 0.01)):
        assert_close_rel(a, b, 1e-15)
    g_plus, g_minus = randn((4, 9), generator, torch.float64), randn((4, 9), generator, torch.float64)
    eps = batched[2]
    mapped_update = torch.func.vmap(ops.fd_update, in_dims=(0, 0, 0, 0, None))(u, g_plus, g_minus, eps, 0.3)
    assert_close_rel(mapped_update, ops.fd_update(u, g_plus, g_minus, eps, 0.3), 1e-15)


def test_opcheck(generator):
    theta, u = randn((3, 10), generator), randn((3, 10), generator)
    torch.library.opcheck(torch.ops.gessl_ext.fd_perturb.default, (theta, u, 0.01))
    eps = ops.fd_perturb(theta, u, 0.01)[2]
    torch.library.opcheck(torch.ops.gessl_ext.fd_update.default, (u, theta, theta * 2, eps, 0.5))


def test_bad_inputs_raise(generator):
    theta, u = randn((2, 4), generator), randn((2, 4), generator)
    with pytest.raises(ValueError, match="u must have the shape"):
        ops.fd_perturb(theta, u[:, :3], 0.01)
    with pytest.raises(ValueError, match="radius"):
        ops.fd_perturb(theta, u, -1.0)
    with pytest.raises(TypeError, match="dtype of theta"):
        ops.fd_perturb(theta, u.double(), 0.01)
    with pytest.raises(ValueError, match="0-dim"):
        ops.fd_perturb(theta[0, 0], u[0, 0], 0.01)
    with pytest.raises(ValueError, match="eps must have shape"):
        ops.fd_update(u, theta, theta, torch.ones(3), 0.1)
    with pytest.raises(TypeError, match="alpha"):
        ops.fd_update(u, theta, theta, torch.ones(2), "0.1")


# ---------------------------------------------------------------- GPU: the CUDA kernels themselves

CUDA_SIZES = [1, 3, 8, 1023, 1025, 12289, 1 << 20]
CUDA_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _extension():
    if _backends.EXTENSION is None:
        pytest.skip(_backends.EXTENSION_ERROR)
    return _backends.EXTENSION


@pytest.mark.cuda
@pytest.mark.parametrize("p", CUDA_SIZES)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_cuda_kernels_match_reference(generator, p, dtype, rows, offset):
    """Poisoned outputs; offset 1 shifts every buffer off 16-byte alignment (scalar path)."""
    extension = _extension()

    def draw():
        return randn((rows * p + offset,), generator, dtype, "cuda")[offset:].view(rows, p)

    theta, u, g_plus, g_minus = draw(), draw(), draw(), draw()
    got = extension.fd_perturb(theta, u, 0.01, poison=True)
    want = ops.fd_perturb_reference(theta, u, 0.01)
    for g, w, name in zip(got, want, ("theta_plus", "theta_minus", "eps")):
        assert g.dtype == w.dtype
        assert_close_rel(g, w, RTOL[dtype], what=name)
    eps = want[2]
    updated = extension.fd_update(u, g_plus, g_minus, eps, 0.25, poison=True)
    assert_close_rel(updated, ops.fd_update_reference(u, g_plus, g_minus, eps, 0.25), RTOL[dtype], what="update")


@pytest.mark.cuda
def test_cuda_public_ops_route_to_extension_and_keep_shapes(generator):
    _extension()
    theta, u = randn((2, 3, 77), generator, device="cuda"), randn((2, 3, 77), generator, device="cuda")
    got = ops.fd_perturb(theta, u, 0.01)
    assert [t.shape for t in got] == [theta.shape, theta.shape, theta.shape[:-1]]
    for g, w in zip(got, ops.fd_perturb_reference(theta, u, 0.01)):
        assert_close_rel(g, w, RTOL[torch.float32])
    flat = ops.fd_perturb(theta[0, 0], u[0, 0], 0.01)
    assert flat[2].shape == ()
    torch.library.opcheck(torch.ops.gessl_ext.fd_perturb.default, (theta, u, 0.01))
    torch.library.opcheck(torch.ops.gessl_ext.fd_update.default, (u, theta, theta * 2, got[2], 0.5))


@pytest.mark.cuda
def test_cuda_empty_rows(generator):
    extension = _extension()
    theta = torch.zeros(3, 0, device="cuda")
    theta_plus, theta_minus, eps = extension.fd_perturb(theta, theta, 0.01, poison=True)
    assert theta_plus.shape == (3, 0)
    assert_close_rel(eps, ops.fd_perturb_reference(theta, theta, 0.01)[2], 1e-6)
