"""GeSSLStep: Algorithm 1 of the paper as one drop-in training step.

For each of the M tasks (two views of N inputs), starting from the shared weights θ:

1. :func:`inner_loop` — K plain SGD steps on the SSL loss (Eq. 2): θᵏ⁺¹ = θᵏ − α∇ℓ(θᵏ).
2. :func:`self_motivated_target` — λ more steps from θᴷ, detached (the target of Eq. 3).
3. :func:`outer_loss_and_grad` — L_l = KL(π(target) ‖ π(θᴷ)) and v = ∂L_l/∂θᴷ.
4. the hypergradient strategy turns v into dL_l/dθ (``gessl_ext.hypergrad``).

L = mean_l L_l; dL/dθ is written to ``.grad`` so the user's optimizer applies Eq. 4.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import gather_views, reduce_across_ranks, task_local_batchnorm
from .head import PairHead, outer_kl
from .hypergrad import HYPERGRADIENTS, HypergradConfig
from .losses import SSLObjective, as_objective
from .tasks import (AdaptedPoint, EagerTaskProblem, TaskModel, TaskProblem, fold_running_stats, per_task_copies,
                    run_tasks)

Tensor = torch.Tensor

TASK_BATCHING = ("auto", "vmap", "loop")

NONSMOOTH_LAYERS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Threshold,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


class NonSmoothModelWarning(UserWarning):
    """``hypergrad="fd"`` on a model whose gradient jumps (ReLU, max-pool): the finite difference is biased."""


@dataclass
class StepOutput:
    """What one step measured (all detached).

    loss: L, the mean outer KL over tasks (0-dim). ssl_loss: mean SSL loss at θ over tasks (0-dim).
    kl: per-task outer KL [M]. hypergrad_norm: ‖dL/dθ‖ (0-dim). skipped: True when a non-finite value
    was found and nothing was written.
    """

    loss: Tensor
    ssl_loss: Tensor
    kl: Tensor
    hypergrad_norm: Tensor
    skipped: bool


# --- Algorithm 1, one task --------------------------------------------------------------------------

def inner_loop(problem: TaskProblem, theta: Tensor, steps: int, stats, record_graph: bool = False):
    """K SGD steps from θ (Eq. 2). Returns ([θ⁰, …, θᴷ], ℓ(θ⁰)); the first pass updates ``stats``.

    ``record_graph`` (one task at a time, for strategies that differentiate the inner loop) keeps the
    iterates' autograd graph back to θ⁰, so the strategy need not run the loop again.
    """
    if record_graph:
        theta = theta.detach().requires_grad_()
    with problem.second_order() if record_graph else contextlib.nullcontext(), torch.enable_grad():
        trajectory = [theta]
        grad, ssl_loss = problem.grad_and_loss(theta, stats)
        for k in range(steps):
            if k > 0:
                grad = problem.grad(trajectory[-1])
            trajectory.append(trajectory[-1] - problem.inner_lr * grad)
    return trajectory, ssl_loss.detach()


def self_motivated_target(problem: TaskProblem, adapted: AdaptedPoint, steps: int):
    """λ more SGD steps from θᴷ (the first from the adapted point's gradient); returns the target's
    embeddings (z1, z2), detached."""
    theta = adapted.theta.detach()
    for step in range(steps):
        grad = adapted.ssl_grad() if step == 0 else problem.grad(theta)
        theta = theta - problem.inner_lr * grad
    with torch.no_grad():
        return tuple(z.detach() for z in problem.embed(theta))


def outer_loss_and_grad(adapted: AdaptedPoint, target, head, use_kernels: bool):
    """(L_l, v = ∂L_l/∂θᴷ): KL(π(target) ‖ π(f_θᴷ)) averaged over the task's 2N samples (Eq. 3)."""
    outer_grad, loss = adapted.outer_grad_and_value(
        lambda z1, z2: outer_kl(head, z1, z2, *target, use_kernels=use_kernels))
    return loss, outer_grad


# --- the step -------------------------------------------------------------------------------------

class GeSSLStep(nn.Module):
    """One GeSSL outer step over M tasks, used like ``loss.backward()``.

    Args:
        model: maps inputs [B, *input_shape] to embeddings [B, d].
        ssl_loss: an :class:`gessl_ext.losses.SSLObjective` or any callable ``loss(z1, z2) -> scalar``.
        inner_lr: α of the inner SGD steps. inner_steps: K ≥ 1. target_steps: λ ≥ 0.
        hypergrad: one of ``gessl_ext.hypergrad.HYPERGRADIENTS`` ("fd", "hvp", "itd", "first_order",
            "neumann", "cg").
        head_temperature: τ of the default pair-classification head; head: a custom head
            ``head(z1, z2) -> log_probs [2N, C]`` (then head_temperature is unused).
        fd_radius: r of ``fd`` (ε = r / ‖u‖). implicit_iters: iterations of ``neumann`` / ``cg``.
        task_batching: "loop" (one task at a time), "vmap" (tasks batched with torch.func.vmap, in
            chunks of ``task_chunk_size``), or "auto": loop on CPU, vmap elsewhere (docs/performance.md).
        autocast_dtype: e.g. torch.bfloat16 to run the forward passes under autocast; parameters,
            finite differences and hypergradients stay in the parameters' dtype.
        use_kernels: use the fused custom ops where they apply (CUDA); False forces plain PyTorch.
        warn_nonsmooth: warn (once) when ``fd`` is used on a model with ReLU-like or max-pool layers.
        process_group: shard the tasks over this torch.distributed group (see gessl_ext.distributed).

    ``step(views)`` with views [M, 2, N, *input_shape] accumulates dL/dθ into ``.grad`` and returns a
    :class:`StepOutput`. Parameters of the objective (e.g. a BYOL predictor) are adapted and trained too,
    so give the optimizer ``step.parameters()``.
    """

    def __init__(self, model: nn.Module, ssl_loss, *, inner_lr: float = 0.05, inner_steps: int = 1,
                 target_steps: int = 10, hypergrad: str = "fd", head_temperature: float = 0.1, head=None,
                 fd_radius: float = 0.01, implicit_iters: int = 5, task_batching: str = "auto",
                 task_chunk_size: int | None = None, autocast_dtype: torch.dtype | None = None,
                 use_kernels: bool = True, warn_nonsmooth: bool = True, process_group=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            process_group = process_group if process_group is not None else model.process_group
            model = model.module
        _check_int("inner_steps", inner_steps, 1)
        _check_int("target_steps", target_steps, 0)
        _check_int("implicit_iters", implicit_iters, 1)
        for name, value in (("inner_lr", inner_lr), ("head_temperature", head_temperature), ("fd_radius", fd_radius)):
            if not (isinstance(value, (int, float)) and value > 0 and value < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if hypergrad not in HYPERGRADIENTS:
            raise ValueError(f"unknown hypergrad {hypergrad!r}; choose one of {sorted(HYPERGRADIENTS)}")
        if task_batching not in TASK_BATCHING:
            raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {task_batching!r}")
        if task_chunk_size is not None:
            _check_int("task_chunk_size", task_chunk_size, 1)
        if head is not None and not callable(head):
            raise TypeError(f"head must be callable head(z1, z2) -> log_probs, got {type(head).__name__}")
        if autocast_dtype is not None and not (isinstance(autocast_dtype, torch.dtype) and autocast_dtype.is_floating_point):
            raise TypeError(f"autocast_dtype must be a floating torch.dtype or None, got {autocast_dtype!r}")

        self.model = model
        self.ssl_loss = as_objective(ssl_loss)
        self.ssl_loss.bind(model)
        self.task_model = TaskModel(self.model, self.ssl_loss, autocast_dtype)
        if self.task_model.spec.size == 0:
            raise ValueError("the model (and objective) have no trainable parameters")
        self.head = head if head is not None else PairHead(head_temperature)
        self.hypergrad = hypergrad
        self.config = HypergradConfig(float(inner_lr), inner_steps, float(fd_radius), implicit_iters, use_kernels)
        self.target_steps = target_steps
        self.task_batching = task_batching
        self.task_chunk_size = task_chunk_size
        self.process_group = process_group
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        if warn_nonsmooth and hypergrad == "fd":
            nonsmooth = sorted({type(m).__name__ for m in model.modules() if isinstance(m, NONSMOOTH_LAYERS)})
            if nonsmooth:
                warnings.warn(
                    f"hypergrad='fd' on a model with non-smooth layers ({', '.join(nonsmooth)}): the finite-difference "
                    "Hessian-vector product is biased there and does not converge as fd_radius -> 0; "
                    "hypergrad='hvp' is exact at a similar cost. Pass warn_nonsmooth=False to silence this.",
                    NonSmoothModelWarning, stacklevel=2,
                )

    # -- public API --

    def forward(self, views: Tensor) -> StepOutput:
        """Run one outer step and accumulate dL/dθ into ``.grad`` (unless skipped)."""
        hypergrad, out = self._hypergradient(views)
        if not out.skipped:
            for p, g in zip(self.task_model.parameters(), self.task_model.spec.unflatten(hypergrad).values()):
                g = g.to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        return out

    def surrogate(self, views: Tensor) -> Tensor:
        """A scalar equal to L whose ``.backward()`` adds exactly dL/dθ to ``.grad``.

        For trainers that call ``backward()`` themselves. Running statistics and objective state are
        updated at call time. On a skipped (non-finite) step its backward adds zeros.
        """
        hypergrad, out = self._hypergradient(views)
        if out.skipped:
            hypergrad = torch.zeros_like(hypergrad)
        params = self.task_model.spec.flatten(self.task_model.parameters())
        inner = params @ hypergrad.to(params.dtype)
        return out.loss.to(params.dtype) + inner - inner.detach()

    @property
    def task_batching_used(self) -> str:
        """The strategy ``auto`` resolves to for the model's device."""
        if self.task_batching != "auto":
            return self.task_batching
        device = next(iter(self.task_model.parameters())).device
        return "loop" if device.type == "cpu" else "vmap"

    # -- internals --

    def _task(self, theta: Tensor, views: Tensor, stats, consts, vmapped):
        """Algorithm 1 for one task: views [2, N, ...] → (dL_l/dθ [P], (L_l, ℓ_l(θ), stats))."""
        strategy = HYPERGRADIENTS[self.hypergrad]
        unrolls = getattr(strategy, "differentiates_inner_loop", False)
        # differentiating the inner loop is reverse-over-reverse, which torch's BatchNorm cannot do under vmap
        plain_batchnorm = vmapped and unrolls
        problem_type = TaskProblem if vmapped else EagerTaskProblem
        problem = problem_type(self.task_model, views[0], views[1], self.config.inner_lr, consts, plain_batchnorm)
        record_graph = not vmapped and unrolls
        trajectory, ssl_loss = inner_loop(problem, theta, self.config.inner_steps, stats or None, record_graph)
        adapted = problem.adapted(trajectory[-1])
        target = self_motivated_target(problem, adapted, self.target_steps)
        loss, outer_grad = outer_loss_and_grad(adapted, target, self.head, self.config.use_kernels)
        hypergrad = strategy(problem, trajectory, outer_grad, self.config)
        return hypergrad.detach(), (loss.detach(), ssl_loss.detach(), stats)

    def _hypergradient(self, views: Tensor):
        """dL/dθ [P] (summed over ranks when distributed) and the StepOutput; updates state unless skipped."""
        self._check_views(views)
        with task_local_batchnorm(self):
            return self._hypergradient_checked(views)

    def _hypergradient_checked(self, views: Tensor):
        self.ssl_loss.before_step(self.model)
        theta = self.task_model.flat_parameters()
        batching = self.task_batching_used
        task_fn = functools.partial(self._task, consts=self.task_model.constants(), vmapped=batching == "vmap")
        stats = per_task_copies(self.task_model.running_stats(), views.shape[0])
        total, (kl, ssl_loss, stats) = run_tasks(task_fn, theta, views, stats, batching, self.task_chunk_size)
        if self.process_group is not None:
            total, kl, ssl_loss, stats = reduce_across_ranks(total, kl, ssl_loss, stats, self.process_group)
            if type(self.ssl_loss).after_step is not SSLObjective.after_step:
                views = gather_views(views, self.process_group)
        hypergrad = total / kl.shape[0]
        loss = kl.mean()
        finite = bool(torch.isfinite(loss) & torch.isfinite(hypergrad).all())
        out = StepOutput(loss.detach(), ssl_loss.mean().detach(), kl.detach(),
                         torch.linalg.vector_norm(hypergrad).detach(), not finite)
        if finite:
            fold_running_stats(self.task_model, stats)
            self.ssl_loss.after_step(self.model, views)
        else:
            self.skipped_steps += 1
        return hypergrad, out

    def _check_views(self, views) -> None:
        if not isinstance(views, Tensor):
            raise TypeError(f"views must be a Tensor [M, 2, N, *input_shape], got {type(views).__name__}")
        if views.dim() < 4:
            raise ValueError(f"views must have shape [M, 2, N, *input_shape] (rank >= 4), got shape {tuple(views.shape)}")
        if views.shape[1] != 2:
            raise ValueError(f"views must hold two views on axis 1, got {views.shape[1]} (shape {tuple(views.shape)})")
        if views.shape[0] < 1:
            raise ValueError("views must hold at least one task (M >= 1)")
        if views.shape[2] < 2:
            raise ValueError(f"each task needs N >= 2 samples for the N-way pair classification, got N={views.shape[2]}")
        param = next(iter(self.task_model.parameters()))
        if views.device != param.device:
            raise ValueError(f"views are on {views.device} but the model is on {param.device}")
        if views.dtype != param.dtype:
            raise TypeError(f"views have dtype {views.dtype} but the model's parameters have {param.dtype}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
