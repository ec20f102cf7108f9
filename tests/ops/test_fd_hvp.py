"""gessl_ext.ops.fd_perturb against explicit formulas; the CUDA kernel (marker ``cuda``) against the PyTorch
reference with NaN-poisoned outputs."""
import math

import pytest
import torch

from gessl_ext import ops
from gessl_ext.ops import _backends
from ops_testing import RTOL, assert_close_rel, randn

ROW_SHAPES = [(), (3,), (2, 3)]
SIZES = [1, 7, 1000]
RADII = [0.01, -0.01]


def explicit_perturb(theta, u, radius):
    """(theta + eps*u, eps) row by row with math.sqrt, in float64."""
    rows_theta, rows_u = theta.reshape(-1, theta.shape[-1]), u.reshape(-1, u.shape[-1])
    perturbed, eps = [], []
    for t, d in zip(rows_theta.tolist(), rows_u.tolist()):
        e = radius / max(math.sqrt(sum(v * v for v in d)), torch.finfo(torch.float64).tiny)
        perturbed.append([a + e * b for a, b in zip(t, d)])
        eps.append(e)
    return (torch.tensor(perturbed, dtype=torch.float64).reshape(theta.shape),
            torch.tensor(eps, dtype=torch.float64).reshape(theta.shape[:-1]))


@pytest.mark.parametrize("rows", ROW_SHAPES)
@pytest.mark.parametrize("p", SIZES)
@pytest.mark.parametrize("radius", RADII)
def test_fd_perturb_matches_explicit_formula(generator, rows, p, radius):
    theta, u = randn((*rows, p), generator, torch.float64), randn((*rows, p), generator, torch.float64)
    got = ops.fd_perturb(theta, u, radius)
    assert len(got) == 2
    for g, want, name in zip(got, explicit_perturb(theta, u, radius), ("perturbed", "eps")):
        assert g.shape == want.shape and g.dtype == torch.float64
        assert_close_rel(g, want, 1e-12, what=name)


def test_negative_radius_steps_against_u(generator):
    """fd_perturb(theta, u, -r) = (theta - (r/||u||) u, -r/||u||), written out per row."""
    theta, u = randn((3, 6), generator, torch.float64), randn((3, 6), generator, torch.float64)
    norms = torch.tensor([math.sqrt(sum(v * v for v in row)) for row in u.tolist()], dtype=torch.float64)
    perturbed, eps = ops.fd_perturb(theta, u, -0.2)
    assert_close_rel(eps, -0.2 / norms, 1e-14, what="eps")
    assert (eps < 0).all()
    assert_close_rel(perturbed, theta - (0.2 / norms)[:, None] * u, 1e-14, what="perturbed")


def test_central_difference_recovers_the_hessian_product_of_a_quadratic(generator):
    """f(theta) = 1/2 theta^T A theta per task: (g(theta + eps u) - g(theta - eps u)) / 2 eps = A u exactly.

    The two points come from two calls with radius +r and -r, the quotient is formed here.
    """
    m, p = 3, 8
    a = randn((m, p, p), generator, torch.float64)
    hessian = a @ a.mT
    theta, u = randn((m, p), generator, torch.float64), randn((m, p), generator, torch.float64)
    theta_plus, eps = ops.fd_perturb(theta, u, 1e-3)
    theta_minus, eps_minus = ops.fd_perturb(theta, u, -1e-3)
    assert torch.equal(eps_minus, -eps)
    gradient = lambda t: (hessian @ t[..., None])[..., 0]  # noqa: E731
    quotient = (gradient(theta_plus) - gradient(theta_minus)) / (2 * eps[:, None])
    assert_close_rel(quotient, (hessian @ u[..., None])[..., 0], 1e-9)


def test_zero_direction_gives_an_unperturbed_copy(generator):
    theta = randn((2, 5), generator)
    u = torch.zeros(2, 5)
    u[1] = randn((5,), generator)
    perturbed, eps = ops.fd_perturb(theta, u, 0.01)
    assert torch.equal(perturbed[0], theta[0]) and perturbed.data_ptr() != theta.data_ptr()
    assert eps[0].item() == pytest.approx(0.01 / torch.finfo(torch.float32).tiny, rel=1e-6)
    assert eps[1].item() == pytest.approx(0.01 / u[1].double().norm().item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("radius", [0.5, -0.5])
def test_low_precision_against_float64(generator, dtype, radius):
    theta, u = randn((3, 257), generator, dtype), randn((3, 257), generator, dtype)
    perturbed, eps = ops.fd_perturb(theta, u, radius)
    assert perturbed.dtype == dtype and eps.dtype == torch.float32
    for got, expected in zip((perturbed, eps), explicit_perturb(theta.double(), u.double(), radius)):
        assert_close_rel(got, expected, RTOL[dtype])


def test_vmap_over_tasks(generator):
    theta, u = randn((4, 9), generator, torch.float64), randn((4, 9), generator, torch.float64)
    mapped = torch.func.vmap(ops.fd_perturb, in_dims=(0, 0, None))(theta, u, -0.01)
    for a, b in zip(mapped, ops.fd_perturb(theta, u, -0.01)):
        assert_close_rel(a, b, 1e-15)
    shared_u = torch.func.vmap(ops.fd_perturb, in_dims=(0, None, None))(theta, u[0], 0.01)
    for a, b in zip(shared_u, ops.fd_perturb(theta, u[:1].expand(4, 9), 0.01)):
        assert_close_rel(a, b, 1e-15)
    moved = torch.func.vmap(ops.fd_perturb, in_dims=(1, 1, None))(theta.T, u.T, 0.01)
    for a, b in zip(moved, ops.fd_perturb(theta, u, 0.01)):
        assert_close_rel(a, b, 1e-15)


@pytest.mark.parametrize("radius", RADII)
def test_opcheck(generator, radius):
    theta, u = randn((3, 10), generator), randn((3, 10), generator)
    torch.library.opcheck(torch.ops.gessl_ext.fd_perturb.default, (theta, u, radius))


def test_bad_inputs_raise(generator):
    theta, u = randn((2, 4), generator), randn((2, 4), generator)
    with pytest.raises(ValueError, match="u must have the shape"):
        ops.fd_perturb(theta, u[:, :3], 0.01)
    for radius in (0, 0.0, -0.0, math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="radius must be finite and nonzero"):
            ops.fd_perturb(theta, u, radius)
    for radius in ("0.01", True, torch.tensor(0.01)):
        with pytest.raises(TypeError, match="radius must be a finite nonzero Python number"):
            ops.fd_perturb(theta, u, radius)
    with pytest.raises(TypeError, match="dtype of theta"):
        ops.fd_perturb(theta, u.double(), 0.01)
    with pytest.raises(TypeError, match="floating dtype"):
        ops.fd_perturb(theta.long(), u.long(), 0.01)
    with pytest.raises(ValueError, match="0-dim"):
        ops.fd_perturb(theta[0, 0], u[0, 0], 0.01)


# ---------------------------------------------------------------- GPU: the CUDA kernel itself

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
def test_cuda_kernel_matches_reference(generator, p, dtype, rows, offset):
    """Poisoned outputs, both signs of the radius; offset 1 shifts every buffer off 16-byte alignment
    (scalar path)."""
    extension = _extension()

    def draw():
        return randn((rows * p + offset,), generator, dtype, "cuda")[offset:].view(rows, p)

    theta, u = draw(), draw()
    for radius in RADII:
        got = extension.fd_perturb(theta, u, radius, poison=True)
        want = ops.fd_perturb_reference(theta, u, radius)
        assert len(got) == 2
        for g, w, name in zip(got, want, ("perturbed", "eps")):
            assert g.dtype == w.dtype
            assert_close_rel(g, w, RTOL[dtype], what=f"{name}, radius {radius}")


@pytest.mark.cuda
def test_cuda_public_op_routes_to_extension_and_keeps_shapes(generator):
    _extension()
    theta, u = randn((2, 3, 77), generator, device="cuda"), randn((2, 3, 77), generator, device="cuda")
    got = ops.fd_perturb(theta, u, -0.01)
    assert [t.shape for t in got] == [theta.shape, theta.shape[:-1]]
    for g, w in zip(got, ops.fd_perturb_reference(theta, u, -0.01)):
        assert_close_rel(g, w, RTOL[torch.float32])
    flat = ops.fd_perturb(theta[0, 0], u[0, 0], 0.01)
    assert flat[1].shape == ()
    torch.library.opcheck(torch.ops.gessl_ext.fd_perturb.default, (theta, u, 0.01))


@pytest.mark.cuda
def test_cuda_empty_rows():
    extension = _extension()
    theta = torch.zeros(3, 0, device="cuda")
    perturbed, eps = extension.fd_perturb(theta, theta, 0.01, poison=True)
    assert perturbed.shape == (3, 0)
    assert_close_rel(eps, ops.fd_perturb_reference(theta, theta, 0.01)[1], 1e-6)
