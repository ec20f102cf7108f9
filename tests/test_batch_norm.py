"""gessl_ext.batch_norm.normalize against torch's BatchNorm / InstanceNorm in float64: values, first and second
derivatives (numerically), and reverse-over-reverse under vmap against torch's fused kernels one task at a time."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vjp, vmap

from gessl_ext.batch_norm import normalize

EPS = 1e-5
CASES = [("batch", spatial, affine) for spatial in [(), (3,), (3, 2)] for affine in (True, False)] + \
        [("instance", spatial, affine) for spatial in [(4,), (3, 2)] for affine in (True, False)]


def ours(kind, x, weight, bias):
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = list(range(2, x.dim())) if kind == "instance" else [0] + list(range(2, x.dim()))
    return normalize(x, None if weight is None else weight.view(shape), None if bias is None else bias.view(shape),
                     EPS, dims)


def torchs(kind, x, weight, bias):
    norm = F.instance_norm if kind == "instance" else F.batch_norm
    return norm(x, None, None, weight, bias, True, 0.1, EPS)


def inputs(spatial, affine, batch=()):
    x = torch.randn(*batch, 5, 4, *spatial, dtype=torch.float64) * 3 + 2      # mean 2, std 3: centring matters
    weight = torch.randn(*batch, 4, dtype=torch.float64) if affine else None
    bias = torch.randn(*batch, 4, dtype=torch.float64) if affine else None
    return x, weight, bias


@pytest.mark.parametrize("kind, spatial, affine", CASES)
def test_values_equal_torch(kind, spatial, affine):
    torch.manual_seed(0)
    x, weight, bias = inputs(spatial, affine)
    assert torch.allclose(ours(kind, x, weight, bias), torchs(kind, x, weight, bias), rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind, spatial, affine", CASES)
def test_first_and_second_derivatives_match_finite_differences(kind, spatial, affine):
    torch.manual_seed(1)
    args = [t.requires_grad_() for t in inputs(spatial, affine) if t is not None]

    def fn(*args):
        return ours(kind, *args) if affine else ours(kind, args[0], None, None)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("kind, spatial, affine", CASES)
def test_reverse_over_reverse_under_vmap_equals_torch_one_task_at_a_time(kind, spatial, affine):
    """What ``itd`` takes under vmap: the vjp of one SGD step θ − α∇ℓ(θ) through a linear layer and the norm, for 3
    tasks at once, against torch's fused kernels task by task (their double backward does not batch)."""
    torch.manual_seed(2)
    tasks = 3
    x, weight, bias = inputs(spatial, True, (tasks,))
    mixing = torch.randn(tasks, 4, 4, dtype=torch.float64)
    target = torch.randn_like(x)
    params = (mixing, weight, bias) if affine else (mixing,)
    cotangent = tuple(torch.randn_like(p) for p in params)

    def hypergradient(norm):
        def loss(params, x, target):
            hidden = torch.einsum("bc...,dc->bd...", x, params[0])
            y = torch.tanh(norm(kind, hidden, *params[1:]) if affine else norm(kind, hidden, None, None))
            return ((y - target) ** 2).sum()

        def task(params, x, target, cotangent):
            step = lambda p: tuple(q - 0.3 * g for q, g in zip(p, grad(loss)(p, x, target)))  # noqa: E731
            return vjp(step, params)[1](cotangent)[0]

        return task

    batched = vmap(hypergradient(ours))(params, x, target, cotangent)
    for l in range(tasks):
        reference = hypergradient(torchs)(tuple(p[l] for p in params), x[l], target[l], tuple(c[l] for c in cotangent))
        for got, want in zip(batched, reference, strict=True):
            assert torch.allclose(got[l], want, rtol=0, atol=1e-12), (got[l] - want).abs().max()


def test_forward_mode_is_refused_with_the_way_out():
    torch.manual_seed(3)
    x, weight, bias = inputs((3,), True)
    with pytest.raises(RuntimeError, match="no forward-mode rule; take Hessian-vector products with problem.hvp"):
        torch.func.jvp(lambda x: ours("batch", x, weight, bias), (x,), (torch.randn_like(x),))
    with pytest.raises(RuntimeError, match="no forward-mode rule"):     # nor jvp of its gradient, as an HVP takes
        torch.func.jvp(grad(lambda x: ours("batch", x, weight, bias).sin().sum()), (x,), (torch.randn_like(x),))
