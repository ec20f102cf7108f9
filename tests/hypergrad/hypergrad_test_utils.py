"""Shared oracles for tests/hypergrad (a uniquely named module so it cannot shadow other test helpers).

* :class:`QuadraticProblem` — ℓ(θ) = ½θᵀAθ − bᵀθ with A SPD: every hypergradient has a closed form.
* :func:`unrolled_reference` — one GeSSL step written with plain ``torch.autograd`` on a per-task loop
  (create_graph through the K inner steps), independent of gessl_ext's flat-parameter machinery.
* :func:`flat_ssl_hessian` — the dense Hessian of an SSL loss in the flat parameters, by plain autograd.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from gessl_ext import GeSSLStep
from gessl_ext.hypergrad import FREED
from gessl_ext.inner import InnerSGD

Tensor = torch.Tensor


# --- quadratic inner problem -----------------------------------------------------------------------

class QuadraticProblem(InnerSGD):
    """grad(θ) = Aθ − b, hvp(θ, v) = Av: the problem protocol the strategies use. A [P, P], b [P]."""

    def __init__(self, matrix: Tensor, offset: Tensor, inner_lr: float, use_kernels: bool = False):
        self.matrix, self.offset, self.inner_lr, self.use_kernels = matrix, offset, inner_lr, use_kernels

    def second_order(self):
        return contextlib.nullcontext()

    def grad(self, theta: Tensor) -> Tensor:
        return self.matrix @ theta - self.offset

    def hvp(self, theta: Tensor, v: Tensor) -> Tensor:
        return self.matrix @ v

    def vjp(self, fn, theta: Tensor, cotangent: Tensor) -> Tensor:
        return torch.func.vjp(fn, theta)[1](cotangent)[0]


def random_spd(dim: int, generator: torch.Generator, batch: tuple = ()) -> Tensor:
    """Random SPD matrices [*batch, dim, dim] with eigenvalues in [0.5, 4.5] (float64)."""
    q, _ = torch.linalg.qr(torch.randn(*batch, dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = 0.5 + 4 * torch.rand(*batch, dim, generator=generator, dtype=torch.float64)
    return q @ torch.diag_embed(eigenvalues) @ q.transpose(-1, -2)


def sgd_trajectory(problem, theta: Tensor, steps: int) -> list[Tensor]:
    """[θ⁰, …, θᴷ] of plain SGD on ``problem``."""
    trajectory = [theta]
    for _ in range(steps):
        trajectory.append(trajectory[-1] - problem.inner_lr * problem.grad(trajectory[-1]))
    return trajectory


def quadratic_results(method, inner_lr, inner_steps, expected_fn, dim: int = 6, num_problems: int = 3):
    """Run ``method`` (a Hypergradient instance) on ``num_problems`` random quadratics (seeded) with K =
    ``inner_steps`` SGD steps of rate ``inner_lr``, one at a time and under ``torch.func.vmap`` with batched
    (A, b, θ, v). Returns (looped, batched, expected), each [num_problems, dim], where expected =
    ``expected_fn(A, v)`` per problem."""
    generator = torch.Generator().manual_seed(1234)
    matrices = random_spd(dim, generator, (num_problems,))
    offsets, thetas, outer_grads = (torch.randn(num_problems, dim, generator=generator, dtype=torch.float64)
                                    for _ in range(3))

    def one(matrix, offset, theta, outer_grad):
        problem = QuadraticProblem(matrix, offset, inner_lr)
        trajectory = sgd_trajectory(problem, theta, inner_steps)
        if not method.uses_adapted_weights:
            trajectory[-1] = FREED           # as the step hands it over (Hypergradient.uses_adapted_weights)
        return method(problem, trajectory, outer_grad.clone())   # the method owns outer_grad (may overwrite it)

    looped = torch.stack([one(*args) for args in zip(matrices, offsets, thetas, outer_grads)])
    batched = vmap(one)(matrices, offsets, thetas, outer_grads)
    expected = torch.stack([expected_fn(a, v) for a, v in zip(matrices, outer_grads)])
    return looped, batched, expected


def check_quadratic_strategy(method, inner_lr, inner_steps, expected_fn, tol: float, dim: int = 6) -> None:
    """Assert that the looped and the vmapped results equal ``expected_fn(A, v)`` to ``tol`` relative and
    each other to 1e-13 (see :func:`quadratic_results`)."""
    looped, batched, expected = quadratic_results(method, inner_lr, inner_steps, expected_fn, dim)
    for got in (looped, batched):
        assert rel_err(got, expected) <= tol, (rel_err(got, expected), tol)
    assert rel_err(batched, looped) <= 1e-13


# --- GeSSL step reference --------------------------------------------------------------------------

def cosine_pair_log_probs(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    """[2N, N]: row i < N is softmax_k cos(z1_i, z2_k)/τ, row N + i is softmax_k cos(z2_i, z1_k)/τ (log)."""
    cos = F.cosine_similarity(z1[:, None, :], z2[None, :, :], dim=-1)
    return torch.cat([F.log_softmax(cos / tau, dim=1), F.log_softmax(cos.T / tau, dim=1)])


def unrolled_reference(model: nn.Module, pair_loss, views: Tensor, inner_lr: float, inner_steps: int,
                       target_steps: int, tau: float) -> dict:
    """One GeSSL step by plain autograd, task by task. views [M, 2, N, ...].

    Returns dict with ``exact`` (dL/dθ [P], flattened like ``model.parameters()``), ``first_order``
    (mean over tasks of ∂L_l/∂θᴷ [P]), ``kl`` [M], ``theta_k`` (list of M flat θᴷ [P]) and
    ``outer_grad`` (list of M flat ∂L_l/∂θᴷ [P]). BatchNorm layers use batch statistics in every pass.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
    names = [name for name, _ in model.named_parameters()]
    weights = [p.detach().requires_grad_() for p in model.parameters()]

    def embeddings(params, x1, x2):
        return functional_call(model, dict(zip(names, params)), (torch.cat([x1, x2]),)).chunk(2)

    exact = [torch.zeros_like(w) for w in weights]
    first_order = [torch.zeros_like(w) for w in weights]
    kls, theta_ks, outer_grads = [], [], []
    for x1, x2 in views:
        adapted = weights
        for _ in range(inner_steps):
            grads = torch.autograd.grad(pair_loss(*embeddings(adapted, x1, x2)), adapted, create_graph=True)
            adapted = [p - inner_lr * g for p, g in zip(adapted, grads)]
        target = [p.detach() for p in adapted]
        for _ in range(target_steps):
            leaves = [p.requires_grad_() for p in target]
            grads = torch.autograd.grad(pair_loss(*embeddings(leaves, x1, x2)), leaves)
            target = [(p - inner_lr * g).detach() for p, g in zip(leaves, grads)]
        with torch.no_grad():
            target_log_probs = cosine_pair_log_probs(*embeddings(target, x1, x2), tau)
        log_probs = cosine_pair_log_probs(*embeddings(adapted, x1, x2), tau)
        kl = F.kl_div(log_probs, target_log_probs, reduction="batchmean", log_target=True)
        grads = torch.autograd.grad(kl, weights + adapted)
        exact = [e + g for e, g in zip(exact, grads[:len(weights)])]
        first_order = [f + g for f, g in zip(first_order, grads[len(weights):])]
        kls.append(kl.detach())
        theta_ks.append(flatten(adapted).detach())
        outer_grads.append(flatten(grads[len(weights):]))
    num_tasks = views.shape[0]
    return {"exact": flatten(exact) / num_tasks, "first_order": flatten(first_order) / num_tasks,
            "kl": torch.stack(kls), "theta_k": theta_ks, "outer_grad": outer_grads}


def flat_ssl_hessian(model: nn.Module, objective, theta: Tensor, x1: Tensor, x2: Tensor) -> Tensor:
    """Dense ∇²ℓ(θ) [P, P] of ``objective(model, x1, x2)`` as a function of the flat parameters θ [P]
    (ordered like ``model.parameters()``), row by row with plain double-backward autograd; BatchNorm layers
    use batch statistics. (Not torch.func.hessian: in torch 2.14 its vmap over directions gets train-mode
    BatchNorm's second derivative wrong by ~1e-2.)"""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = theta.detach().requires_grad_()
    chunks = torch.split(theta, [s.numel() for s in shapes])
    params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
    loss = objective(lambda x: functional_call(model, params, (x,)), x1, x2)
    (gradient,) = torch.autograd.grad(loss, theta, create_graph=True)
    return torch.stack([torch.autograd.grad(g, theta, retain_graph=True)[0] for g in gradient])


# --- running GeSSLStep -----------------------------------------------------------------------------

def flatten(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(value: Tensor, reference: Tensor) -> float:
    """‖value − reference‖ / ‖reference‖."""
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference))


def step_hypergradient(model: nn.Module, views: Tensor, objective, **step_kwargs) -> tuple[Tensor, object]:
    """dL/dθ [P] that ``GeSSLStep(model, objective, **step_kwargs)(views)`` writes to fresh ``.grad``s."""
    step = GeSSLStep(model, objective, **step_kwargs)
    model.zero_grad(set_to_none=True)
    out = step(views)
    hypergrad = flatten([p.grad for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return hypergrad, out


def smooth_mlp(in_dim: int = 6, hidden: int = 10, out_dim: int = 5, batchnorm: bool = False) -> nn.Module:
    """Linear → (BatchNorm1d) → Tanh → Linear → SiLU → Linear (float64): twice continuously differentiable."""
    norm = [nn.BatchNorm1d(hidden)] if batchnorm else []
    return nn.Sequential(nn.Linear(in_dim, hidden), *norm, nn.Tanh(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim)).double()
