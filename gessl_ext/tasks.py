"""The batched task model: the network and the SSL objective as functions of flat parameters.

Every per-task quantity in a GeSSL step (inner gradients, Hessian-vector products, embeddings) is a
function of one flat parameter vector θ [P]. A task's code is written once, for one task, and
:func:`run_tasks` maps it over the M tasks either one at a time (``"loop"``) or in chunks with
``torch.func.vmap`` (``"vmap"``). The task's derivatives come from a problem object with one protocol
and two implementations: :class:`TaskProblem` (``torch.func`` transforms, which compose with vmap)
and :class:`EagerTaskProblem` (plain ``torch.autograd``, cheaper one task at a time).

BatchNorm rule: every pass of the inner loop, the target, the head and the hypergradient normalises
with the task's own batch statistics and leaves running statistics alone. Running statistics are
updated once per task, from the task's first forward at the shared weights θ (both views together,
2N inputs), in task order, exactly as M ordinary training steps on the M task batches would leave
them (:func:`fold_running_stats`). A model in ``eval()`` mode uses and keeps its running statistics.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import functional_call, grad_and_value, jvp, vjp, vmap

Tensor = torch.Tensor


class FlatParams:
    """Maps a name → tensor dict of parameters to one flat vector [P] and back (as views)."""

    def __init__(self, named: dict[str, Tensor]):
        self.names = list(named)
        self.shapes = [t.shape for t in named.values()]
        self.numels = [t.numel() for t in named.values()]
        self.size = sum(self.numels)

    def flatten(self, tensors) -> Tensor:
        """[P] copy of the given tensors (same order as ``names``)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` [P] shaped like the parameters."""
        chunks = torch.split(flat, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}


class _Joint(nn.Module):
    """Model and objective under one root, so one functional_call swaps the parameters of both."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x1: Tensor, x2: Tensor, what: str = "loss"):
        """``what``: "loss" → ℓ; "embed" → (z1, z2); "loss_and_embed" → (ℓ, z1, z2) from ONE forward of the
        model (for objectives with ``embeds_views_once``, whose single embed call is reused)."""
        if what == "embed":
            return self.model(torch.cat([x1, x2])).chunk(2)
        if what == "loss":
            return self.objective(self.model, x1, x2)
        embedded = []

        def embed(x):
            embedded.append(self.model(x))
            return embedded[-1]

        loss = self.objective(embed, x1, x2)
        if len(embedded) != 1 or embedded[0].shape[0] != 2 * x1.shape[0]:
            shapes = [tuple(z.shape) for z in embedded]
            raise RuntimeError(
                f"{type(self.objective).__name__} sets embeds_views_once = True but its forward called embed "
                f"{len(embedded)} time(s) (outputs {shapes}); it must call embed(torch.cat([x1, x2])) exactly once, "
                "or set embeds_views_once = False")
        return (loss, *embedded[0].chunk(2))


def _tracked_batchnorms(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


@contextlib.contextmanager
def _running_stats(batchnorms, enabled: bool):
    """Temporarily switch running-statistics tracking of the given BatchNorm layers on or off."""
    saved = [m.track_running_stats for m in batchnorms]
    for m in batchnorms:
        m.track_running_stats = enabled
    try:
        yield
    finally:
        for m, s in zip(batchnorms, saved):
            m.track_running_stats = s


def _plain_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Training-mode BatchNorm from elementary ops (batch statistics, optional running-stat update).

    Used for reverse-over-reverse differentiation under vmap (``itd``), where torch's fused
    BatchNorm double backward has no batching rule.
    """
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        count = x.numel() // x.shape[1]
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        with torch.no_grad():
            bn.running_mean.mul_(1 - factor).add_(factor * mean.detach())
            bn.running_var.mul_(1 - factor).add_(factor * var.detach() * count / max(count - 1, 1))
    return y


@contextlib.contextmanager
def _plain_batchnorms(batchnorms, enabled: bool):
    """Temporarily run the given BatchNorm layers with :func:`_plain_batch_norm` (train mode only)."""
    swapped = [m for m in batchnorms if enabled and m.training]
    for m in swapped:
        m.forward = functools.partial(_plain_batch_norm, m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


class TaskModel:
    """The model + SSL objective as pure functions of flat trainable parameters θ [P].

    Frozen parameters and buffers are read from the modules at call time (constants).
    """

    def __init__(self, model: nn.Module, objective: nn.Module, autocast_dtype: torch.dtype | None = None):
        self.joint = _Joint(model, objective)
        trainable = {n: p for n, p in self.joint.named_parameters() if p.requires_grad}
        self.spec = FlatParams(trainable)
        self.autocast_dtype = autocast_dtype
        self._all_bn = list(_tracked_batchnorms(self.joint).values())
        model_bn = _tracked_batchnorms(model)
        self.bn_modules = {f"model.{n}": m for n, m in model_bn.items()}
        self.stat_names = [f"{n}.{b}" for n in self.bn_modules for b in ("running_mean", "running_var", "num_batches_tracked")]

    def parameters(self) -> list[nn.Parameter]:
        named = dict(self.joint.named_parameters())
        return [named[n] for n in self.spec.names]

    def flat_parameters(self) -> Tensor:
        """θ as a detached flat copy [P]."""
        return self.spec.flatten([p.detach() for p in self.parameters()])

    def constants(self) -> dict[str, Tensor]:
        trainable = set(self.spec.names)
        consts = {n: p.detach() for n, p in self.joint.named_parameters() if n not in trainable}
        consts.update(dict(self.joint.named_buffers()))
        return consts

    def running_stats(self) -> dict[str, Tensor]:
        """The model's BatchNorm running statistics, by name (empty if none or in eval mode)."""
        if not self.joint.model.training:
            return {}
        buffers = dict(self.joint.named_buffers())
        return {n: buffers[n] for n in self.stat_names}

    def call(self, theta: Tensor, x1: Tensor, x2: Tensor, what: str, consts, stats=None, plain_batchnorm=False):
        """Run the joint module at θ [P] on one task; ``stats`` (BatchNorm buffer copies) are updated in place.

        ``plain_batchnorm`` computes BatchNorm from elementary ops (see :func:`_plain_batch_norm`).
        """
        state = {**consts, **self.spec.unflatten(theta), **(stats or {})}
        autocast = torch.autocast(x1.device.type, dtype=self.autocast_dtype or torch.float32,
                                  enabled=self.autocast_dtype is not None)
        with _running_stats(self._all_bn, False), _running_stats(
            list(self.bn_modules.values()) if stats else [], True
        ), _plain_batchnorms(self._all_bn, plain_batchnorm), autocast:
            out = functional_call(self.joint, state, (x1, x2), {"what": what}, strict=False)
        if what == "loss":
            return out.to(theta.dtype)
        return tuple(t.to(theta.dtype) for t in out)

    @property
    def embeds_views_once(self) -> bool:
        """True when the objective's loss pass embeds cat(x1, x2) once, so that forward can serve the head too."""
        return bool(getattr(self.joint.objective, "embeds_views_once", False))


class TaskProblem:
    """One task's inner problem ℓ(θ; x1, x2) with its derivatives, θ [P], by ``torch.func`` transforms.

    This is the protocol the hypergradient strategies use: ``grad``, ``hvp``, ``vjp``, ``second_order``,
    ``inner_lr``. These transforms compose with ``vmap`` (tasks batched); :class:`EagerTaskProblem`
    computes the same quantities with plain ``torch.autograd`` for one task at a time.
    """

    def __init__(self, task_model: TaskModel, x1: Tensor, x2: Tensor, inner_lr: float, consts,
                 plain_batchnorm: bool = False):
        self.task_model, self.x1, self.x2, self.inner_lr, self.consts = task_model, x1, x2, inner_lr, consts
        self.plain_batchnorm = plain_batchnorm

    def call(self, theta: Tensor, what: str, stats=None):
        return self.task_model.call(theta, self.x1, self.x2, what, self.consts, stats, self.plain_batchnorm)

    def loss(self, theta: Tensor, stats=None) -> Tensor:
        return self.call(theta, "loss", stats)

    def embed(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Embeddings of both views at θ: ([N, d], [N, d])."""
        return self.call(theta, "embed")

    # -- differentiation primitives (overridden by EagerTaskProblem) --

    def grad_and_value(self, fn: Callable, theta: Tensor, *args) -> tuple[Tensor, Tensor]:
        """(∇_θ fn(θ, *args) [P], fn(θ, *args)) for a scalar fn."""
        return grad_and_value(fn)(theta, *args)

    def vjp(self, fn: Callable, theta: Tensor, cotangent: Tensor, value: Tensor | None = None) -> Tensor:
        """cotangentᵀ ∂fn/∂θ [P] for fn: [P] → [P]. ``value``: fn(θ) if already computed; the eager problem
        differentiates it directly when it carries its autograd graph back to θ, instead of calling fn."""
        return vjp(fn, theta)[1](cotangent)[0]

    def hvp(self, theta: Tensor, v: Tensor) -> Tensor:
        """Exact Hessian-vector product ∇²ℓ(θ) v [P], forward-over-reverse (jvp of the gradient): under vmap
        it is faster than double backward and works with BatchNorm, whose double backward does not batch."""
        with self.second_order():
            return jvp(self.grad, (theta,), (v,))[1]

    @staticmethod
    def second_order():
        """Context for passes differentiated twice: attention on its composite (math) kernel, since the
        fused attention kernels have neither a double-backward nor a forward-mode rule."""
        return sdpa_kernel(SDPBackend.MATH)

    # -- built on the primitives --

    def grad(self, theta: Tensor) -> Tensor:
        """∇ℓ(θ) [P]."""
        return self.grad_and_value(self.loss, theta)[0]

    def grad_and_loss(self, theta: Tensor, stats=None) -> tuple[Tensor, Tensor]:
        """(∇ℓ(θ) [P], ℓ(θ)); BatchNorm ``stats`` copies, if given, take this pass's running-stat update."""
        return self.grad_and_value(self.loss, theta, stats)

    def adapted(self, theta: Tensor) -> "AdaptedPoint":
        """The adapted weights θᴷ, where the target's first step and the outer loss both evaluate the model."""
        return AdaptedPoint(self, theta)


class AdaptedPoint:
    """The model at the adapted weights θᴷ: ``ssl_grad()`` = ∇ℓ(θᴷ) (the target's first step) and
    ``outer_grad_and_value(outer)`` = (∂/∂θᴷ, value) of ``outer(z1, z2)`` on the embeddings at θᴷ.
    Here each is its own pass; :class:`EagerTaskProblem` shares one forward between them."""

    def __init__(self, problem: TaskProblem, theta: Tensor):
        self.problem, self.theta = problem, theta

    def ssl_grad(self) -> Tensor:
        return self.problem.grad(self.theta)

    def outer_grad_and_value(self, outer: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        return self.problem.grad_and_value(lambda theta: outer(*self.problem.embed(theta)), self.theta)


class EagerTaskProblem(TaskProblem):
    """:class:`TaskProblem` by plain ``torch.autograd``, for one task at a time (``task_batching="loop"``).

    Same values as the ``torch.func`` version without its per-operation dispatch overhead (≈5 % of a
    gradient pass of the CPU benchmark convnet), and the adapted point shares one forward between the
    target's first step and the outer loss (docs/performance.md). A gradient is itself differentiable
    (``create_graph``) exactly when θ requires grad, which is how ``vjp`` and ``hvp`` differentiate it.
    """

    def grad_and_value(self, fn, theta, *args):
        differentiable = theta.requires_grad
        x = theta if differentiable else theta.detach().requires_grad_()
        with torch.enable_grad():
            value = fn(x, *args)
            (grad_x,) = torch.autograd.grad(value, x, create_graph=differentiable)
        return grad_x, value if differentiable else value.detach()

    def vjp(self, fn, theta, cotangent, value=None):
        if value is not None and theta.requires_grad and value.requires_grad:
            return torch.autograd.grad(value, theta, cotangent)[0]
        x = theta.detach().requires_grad_()
        with torch.enable_grad():
            return torch.autograd.grad(fn(x), x, cotangent)[0]

    def hvp(self, theta, v):
        """∇²ℓ(θ) v by double backward: vᵀ∇²ℓ = (∇²ℓ v)ᵀ since the Hessian is symmetric."""
        with self.second_order():
            return self.vjp(self.grad, theta, v)

    def adapted(self, theta):
        if not self.task_model.embeds_views_once:
            return AdaptedPoint(self, theta)
        return _SharedForwardPoint(self, theta)


class _SharedForwardPoint(AdaptedPoint):
    """One forward at θᴷ yields ℓ and the embeddings; its graph serves both backward passes. ``ssl_grad``
    must come first (it keeps the graph; ``outer_grad_and_value`` frees it)."""

    def __init__(self, problem: EagerTaskProblem, theta: Tensor):
        super().__init__(problem, theta)
        self.leaf = theta.detach().requires_grad_()
        with torch.enable_grad():
            self.loss, self.z1, self.z2 = problem.call(self.leaf, "loss_and_embed")

    def ssl_grad(self):
        return torch.autograd.grad(self.loss, self.leaf, retain_graph=True)[0]

    def outer_grad_and_value(self, outer):
        with torch.enable_grad():
            value = outer(self.z1, self.z2)
            (grad_theta,) = torch.autograd.grad(value, self.leaf)
        return grad_theta, value.detach()


def run_tasks(task_fn: Callable, theta: Tensor, views: Tensor, stats: dict[str, Tensor], batching: str,
              chunk_size: int | None):
    """Map ``task_fn(theta, views_l, stats_l) -> (hypergrad [P], aux)`` over the M tasks.

    ``batching="loop"`` runs one task at a time; ``"vmap"`` runs chunks of ``chunk_size`` tasks (all M
    when None) as one ``torch.func.vmap`` call. Returns (Σ_l hypergrad_l [P], aux stacked over tasks).
    """
    num_tasks = views.shape[0]
    chunk = 1 if batching == "loop" else (chunk_size or num_tasks)
    # A BatchNorm counter is read with float() when momentum is None, which vmap cannot batch; every
    # task's counter holds the same value, so the vmapped tasks share one unbatched copy.
    stat_dims = {n: None if n.endswith("num_batches_tracked") else 0 for n in stats}
    batched_fn = vmap(task_fn, in_dims=(None, 0, stat_dims), randomness="error")
    total, auxes = None, []
    for start in range(0, num_tasks, chunk):
        part = slice(start, start + chunk)
        if batching == "loop":
            hypergrad, aux = task_fn(theta, views[start], {n: s[start] for n, s in stats.items()})
            aux = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), aux)
        else:
            stats_part = {n: s[part] if stat_dims[n] == 0 else s[start].clone() for n, s in stats.items()}
            hypergrad, aux = batched_fn(theta, views[part], stats_part)
            hypergrad = hypergrad.sum(0)
        total = hypergrad if total is None else total + hypergrad
        auxes.append(aux)
    aux = torch.utils._pytree.tree_map(lambda *ts: torch.cat(ts), *auxes)
    return total, aux


def per_task_copies(stats: dict[str, Tensor], num_tasks: int) -> dict[str, Tensor]:
    """One copy of each running-stat buffer per task: [M, *shape]."""
    return {n: s.unsqueeze(0).repeat(num_tasks, *([1] * s.dim())) for n, s in stats.items()}


@torch.no_grad()
def fold_running_stats(task_model: TaskModel, per_task: dict[str, Tensor]) -> None:
    """Apply M per-task running-stat updates in task order, as M ordinary training steps would.

    Each task's copy started from the current statistics r0 and took one update
    r0 → (1-f₁) r0 + f₁ s_l with the layer's factor f₁; s_l (the task's batch statistic) is recovered
    and the updates are replayed in sequence with the factors the layer would have used.
    """
    if not per_task:
        return
    buffers = dict(task_model.joint.named_buffers())
    for name, bn in task_model.bn_modules.items():
        count = buffers[f"{name}.num_batches_tracked"]
        tasks_run = int((per_task[f"{name}.num_batches_tracked"] - count).max())
        if tasks_run == 0 or bn.momentum == 0:
            continue
        for stat in ("running_mean", "running_var"):
            r0 = buffers[f"{name}.{stat}"]
            first = bn.momentum if bn.momentum is not None else 1.0 / (float(count) + 1)
            batch_stats = (per_task[f"{name}.{stat}"] - (1 - first) * r0) / first
            running = r0.clone()
            for j, s in enumerate(batch_stats, start=1):
                factor = bn.momentum if bn.momentum is not None else 1.0 / (float(count) + j)
                running.mul_(1 - factor).add_(s, alpha=factor)
            r0.copy_(running)
        count.add_(per_task[f"{name}.num_batches_tracked"].shape[0])
