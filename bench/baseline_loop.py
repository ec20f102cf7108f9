"""The per-task-loop baseline: one GeSSL step written the way a researcher first writes it.

A Python loop over the M tasks; each task starts from its own copy of the parameters (a dict of
tensors swapped into the model with ``torch.func.functional_call``); every derivative is a plain
``torch.autograd.grad`` call:

* ``itd``: the K inner steps keep their graph (``create_graph=True``) and dL_l/dθ is one reverse pass.
* ``fd``: DARTS — the inner steps run without a graph and the K Jacobian-vector products of the
  backward recursion u ← u − α H(θᵏ) u use the central difference
  H u ≈ (∇ℓ(θᵏ + εu) − ∇ℓ(θᵏ − εu)) / 2ε with ε = r / ‖u‖.
* ``hvp``: the same recursion with H u by double backward at θᵏ.

It computes exactly what :class:`gessl_ext.GeSSLStep` computes (SSL loss on one forward of
cat(x1, x2); target = λ more SGD steps from θᴷ, detached; pair-classification head with cosine
logits / τ in both directions; KL(target ‖ current) averaged over the 2N rows; mean over tasks) and
leaves BatchNorm running statistics as M ordinary training steps on the task batches would: only the
first forward of each task (at θ) updates them. tests/bench/test_baseline_loop.py checks both.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gessl_ext.inner import sgd_update, sgd_update_vjp
from gessl_ext.losses import as_objective

Tensor = torch.Tensor
METHODS = ("fd", "itd", "hvp")


@dataclass
class BaselineOutput:
    """loss: mean outer KL (0-dim); ssl_loss: mean SSL loss at θ (0-dim); kl: per-task KL [M]."""

    loss: Tensor
    ssl_loss: Tensor
    kl: Tensor


def pair_log_probs(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """log π [2N, N]: row i < N is view-1 sample i against all view-2 samples, row N + i the reverse."""
    cosine = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T
    return torch.log_softmax(torch.cat([cosine, cosine.T]) / temperature, dim=1)


class BaselineLoopStep:
    """The GeSSL step as a per-task loop; ``step(views)`` adds dL/dθ to the model's ``.grad``.

    Args mirror :class:`gessl_ext.GeSSLStep` (``hypergrad`` is one of "fd", "itd", "hvp"). The
    objective must have no trainable parameters of its own. views: [M, 2, N, *input_shape].
    """

    def __init__(self, model: nn.Module, ssl_loss, *, inner_lr: float = 0.05, inner_steps: int = 1,
                 target_steps: int = 10, hypergrad: str = "fd", head_temperature: float = 0.1,
                 fd_radius: float = 0.01, autocast_dtype: torch.dtype | None = None):
        if hypergrad not in METHODS:
            raise ValueError(f"the baseline implements hypergrad in {METHODS}, got {hypergrad!r}")
        self.objective = as_objective(ssl_loss)
        if any(p.requires_grad for p in self.objective.parameters()):
            raise ValueError("the baseline supports objectives without trainable parameters only")
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.inner_lr, self.inner_steps, self.target_steps = inner_lr, inner_steps, target_steps
        self.hypergrad, self.temperature, self.fd_radius = hypergrad, head_temperature, fd_radius
        self.autocast_dtype = autocast_dtype

    # -- model evaluations at a parameter dict --

    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def _ssl_loss(self, params: dict, x1: Tensor, x2: Tensor, buffers: dict) -> Tensor:
        dtype = next(iter(params.values())).dtype

        def embed(x):  # the network under autocast, the loss in the parameters' dtype (as GeSSLStep)
            with self._autocast(x.device.type):
                z = functional_call(self.model, {**params, **buffers}, (x,))
            return z.to(dtype)

        return self.objective(embed, x1, x2)

    def _embed(self, params: dict, x1: Tensor, x2: Tensor, buffers: dict):
        with self._autocast(x1.device.type):
            z = functional_call(self.model, {**params, **buffers}, (torch.cat([x1, x2]),))
        return z.to(next(iter(params.values())).dtype).chunk(2)

    def _grad(self, params: dict, x1, x2, buffers, create_graph=False) -> dict:
        loss = self._ssl_loss(params, x1, x2, buffers)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        return dict(zip(params, grads))

    @staticmethod
    def _leaf(params: dict) -> dict:
        return {n: p.detach().requires_grad_() for n, p in params.items()}

    # -- the step --

    def __call__(self, views: Tensor) -> BaselineOutput:
        named = dict(self.model.named_parameters())
        scratch = {n: b.clone() for n, b in self.model.named_buffers()}  # later passes leave the real stats alone
        total = {n: torch.zeros_like(named[n]) for n in self.names}
        kls, ssl_losses = [], []
        for task in views:
            x1, x2 = task[0], task[1]
            theta = {n: named[n].detach().clone().requires_grad_() for n in self.names}  # per-task copy
            hypergrad, kl, ssl_loss = self._task(theta, x1, x2, scratch)
            for n in self.names:
                total[n] += hypergrad[n]
            kls.append(kl)
            ssl_losses.append(ssl_loss)
        for n in self.names:
            g = total[n] / views.shape[0]
            if named[n].grad is None:
                named[n].grad = g
            else:
                named[n].grad += g
        kl = torch.stack(kls)
        return BaselineOutput(kl.mean(), torch.stack(ssl_losses).mean(), kl)

    def _task(self, theta: dict, x1: Tensor, x2: Tensor, scratch: dict):
        """dL_l/dθ (dict), L_l and ℓ_l(θ) for one task."""
        create_graph = self.hypergrad == "itd"
        trajectory = [theta]
        for k in range(self.inner_steps):
            params = trajectory[-1]
            buffers = {} if k == 0 else scratch  # the first forward at θ updates the running statistics
            loss = self._ssl_loss(params, x1, x2, buffers)
            if k == 0:
                ssl_loss = loss.detach()
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            step = {n: sgd_update(p, g, self.inner_lr) for (n, p), g in zip(params.items(), grads)}
            trajectory.append(step if create_graph else self._leaf(step))

        target = self._leaf(trajectory[-1])
        for _ in range(self.target_steps):
            grads = self._grad(target, x1, x2, scratch)
            target = self._leaf({n: sgd_update(p, grads[n], self.inner_lr) for n, p in target.items()})
        with torch.no_grad():
            target_log_probs = pair_log_probs(*self._embed(target, x1, x2, scratch), self.temperature)

        log_probs = pair_log_probs(*self._embed(trajectory[-1], x1, x2, scratch), self.temperature)
        kl = (target_log_probs.exp() * (target_log_probs - log_probs)).sum(1).mean()

        if create_graph:
            grads = torch.autograd.grad(kl, list(theta.values()))
            return dict(zip(theta, grads)), kl.detach(), ssl_loss

        u = dict(zip(theta, torch.autograd.grad(kl, list(trajectory[-1].values()))))
        for params in reversed(trajectory[:-1]):
            hu = self._fd_hvp(params, u, x1, x2, scratch) if self.hypergrad == "fd" else \
                self._exact_hvp(params, u, x1, x2, scratch)
            u = {n: sgd_update_vjp(u[n], hu[n], self.inner_lr) for n in u}
        return u, kl.detach(), ssl_loss

    def _fd_hvp(self, params: dict, u: dict, x1, x2, scratch) -> dict:
        """(∇ℓ(θ + εu) − ∇ℓ(θ − εu)) / 2ε with ε = r / ‖u‖ (‖·‖ over all parameters)."""
        norm = torch.sqrt(sum((t * t).sum() for t in u.values()))
        eps = self.fd_radius / norm.clamp_min(1e-30)
        with torch.no_grad():
            plus = self._leaf({n: p + eps * u[n] for n, p in params.items()})
            minus = self._leaf({n: p - eps * u[n] for n, p in params.items()})
        g_plus = self._grad(plus, x1, x2, scratch)
        g_minus = self._grad(minus, x1, x2, scratch)
        return {n: (g_plus[n] - g_minus[n]) / (2 * eps) for n in u}

    def _exact_hvp(self, params: dict, u: dict, x1, x2, scratch) -> dict:
        """∇²ℓ(θ) u by differentiating ⟨∇ℓ(θ), u⟩ once more."""
        grads = self._grad(params, x1, x2, scratch, create_graph=True)
        hu = torch.autograd.grad(list(grads.values()), list(params.values()), grad_outputs=list(u.values()))
        return dict(zip(params, hu))
