"""The batched task model: the network and the SSL objective as functions of flat parameters.

Every per-task quantity in a GeSSL step (inner gradients, Hessian-vector products, embeddings) is a
function of one flat parameter vector θ [P]. A task's code is written once, for one task, and
:func:`run_tasks` maps it over the M tasks either one at a time (``"loop"``) or in chunks with
``torch.func.vmap`` (``"vmap"``).

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
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

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
        if what == "loss":
            return self.objective(self.model, x1, x2)
        z1, z2 = self.model(torch.cat([x1, x2])).chunk(2)
        return z1, z2


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
        return tuple(z.to(theta.dtype) for z in out)


class TaskProblem:
    """One task's inner problem ℓ(θ; x1, x2) with its derivatives, θ [P].

    This is the protocol the hypergradient strategies use: ``grad``, ``hvp``, ``inner_lr``.
    """

    def __init__(self, task_model: TaskModel, x1: Tensor, x2: Tensor, inner_lr: float, consts,
                 plain_batchnorm: bool = False):
        self.task_model, self.x1, self.x2, self.inner_lr, self.consts = task_model, x1, x2, inner_lr, consts
        self.plain_batchnorm = plain_batchnorm

    def loss(self, theta: Tensor, stats=None) -> Tensor:
        return self.task_model.call(theta, self.x1, self.x2, "loss", self.consts, stats, self.plain_batchnorm)

    def grad(self, theta: Tensor) -> Tensor:
        """∇ℓ(θ) [P]."""
        return grad(self.loss)(theta)

    def grad_and_loss(self, theta: Tensor, stats=None) -> tuple[Tensor, Tensor]:
        """(∇ℓ(θ) [P], ℓ(θ)); BatchNorm ``stats`` copies, if given, take this pass's running-stat update."""
        return grad_and_value(self.loss)(theta, stats)

    @staticmethod
    def second_order():
        """Context for passes differentiated twice: attention on its composite (math) kernel, since the
        fused attention kernels have neither a double-backward nor a forward-mode rule."""
        return sdpa_kernel(SDPBackend.MATH)

    def hvp(self, theta: Tensor, v: Tensor) -> Tensor:
        """Exact Hessian-vector product ∇²ℓ(θ) v [P], forward-over-reverse (jvp of the gradient).

        It costs about what double backward costs one task at a time (≈ 2.8 gradient passes on the
        CPU), is faster under vmap, and works there with BatchNorm, whose double backward does not.
        """
        with self.second_order():
            return jvp(self.grad, (theta,), (v,))[1]

    def embed(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Embeddings of both views at θ: ([N, d], [N, d])."""
        return self.task_model.call(theta, self.x1, self.x2, "embed", self.consts, None, self.plain_batchnorm)


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
