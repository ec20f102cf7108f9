"""GeSSLStep: Algorithm 1 of the paper as one drop-in training step.

For each of the M tasks (two views of N inputs), starting from the shared weights θ:

1. :func:`inner_loop` — K plain SGD steps on the SSL loss (Eq. 2): θᵏ⁺¹ = θᵏ − α∇ℓ(θᵏ).
2. :func:`self_motivated_target` — λ more steps from θᴷ, detached (the target of Eq. 3).
3. :func:`outer_loss_and_grad` — L_l = KL(π(target) ‖ π(θᴷ)) and v = ∂L_l/∂θᴷ.
4. the hypergradient strategy turns v into dL_l/dθ (``gessl_ext.hypergrad``).

L = mean_l L_l; dL/dθ is written to ``.grad`` so the user's optimizer applies Eq. 4.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .batching import TASK_BATCHING, TaskBatching, auto_batching
from .distributed import gather_views, reduce_across_ranks, task_local_batchnorm
from .head import PairHead, outer_kl
from .hypergrad import FD, FREED, Hypergradient, resolve
from .losses import as_objective
from .tasks import (AdaptedPoint, EagerTaskProblem, TaskModel, TaskProblem, fold_running_stats, per_task_copies,
                    run_tasks)

Tensor = torch.Tensor

NONSMOOTH_LAYERS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Threshold,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


class NonSmoothModelWarning(UserWarning):
    """``hypergrad="fd"`` on a model whose gradient jumps (ReLU, max-pool): the finite difference is biased."""


@dataclass
class StepOutput:
    """What one step measured (all detached, in the parameters' dtype, on their device; covering every rank's
    tasks in a distributed step).

    loss: L = mean_l KL(π(target_l) ‖ π(θᴷ_l)), the outer loss (0-dim, nats). ssl_loss: mean over tasks of the SSL
    loss at the shared θ (0-dim). kl: per-task outer KL [M] (nats). hypergrad_norm: ‖dL/dθ‖₂ (0-dim).
    skipped: True when L or dL/dθ was not finite and nothing was written.
    """

    loss: Tensor
    ssl_loss: Tensor
    kl: Tensor
    hypergrad_norm: Tensor
    skipped: bool


# --- Algorithm 1, one task --------------------------------------------------------------------------

def inner_loop(problem: TaskProblem, theta: Tensor, steps: int, stats):
    """K SGD steps from θ (Eq. 2). Returns ([θ⁰, …, θᴷ], ℓ(θ⁰)); the first pass updates ``stats``.

    The problem decides whether the iterates keep their autograd graph back to θ⁰ (``problem.recorded_graph``:
    one task at a time, for a strategy that differentiates the inner loop, which then need not run it again).
    """
    with problem.recording(theta) as trajectory:
        grad, ssl_loss = problem.grad_and_loss(trajectory[0], stats)
        for k in range(steps):
            trajectory.append(problem.update(trajectory[-1], grad if k == 0 else None))
    return trajectory, ssl_loss.detach()


def self_motivated_target(problem: TaskProblem, adapted: AdaptedPoint, steps: int):
    """λ more SGD steps from θᴷ (the first from the adapted point's gradient into a new point, per-parameter tensors
    under vmap, the others in place on it; it carries no graph: the gradient at θᴷ is detached, as θᴷ may record one
    for ``itd``); returns the target's embeddings (z1, z2), detached."""
    theta = adapted.theta.detach()
    for step in range(steps):
        if step == 0:
            theta = problem.stepped(theta, [grad.detach() for grad in adapted.ssl_grad_pieces()])
        else:
            problem.update_(theta)
    with torch.no_grad():
        return tuple(z.detach() for z in problem.embed(theta))


def outer_loss_and_grad(adapted: AdaptedPoint, target, head):
    """(L_l, v = ∂L_l/∂θᴷ): KL(π(target) ‖ π(f_θᴷ)) averaged over the task's 2N samples (Eq. 3)."""
    use_kernels = adapted.problem.use_kernels
    outer_grad, loss = adapted.outer_grad_and_value(
        lambda z1, z2: outer_kl(head, z1, z2, *target, use_kernels=use_kernels))
    return loss, outer_grad


# --- the step -------------------------------------------------------------------------------------

class GeSSLStep(nn.Module):
    """One GeSSL outer step over M tasks (Algorithm 1; Eqs. 2–4), used like ``loss.backward()``.

    ``out = step(views)`` runs, for each task l of ``views`` [M, 2, N, *input_shape] (two views of N inputs,
    on the model's device, in its parameters' dtype), K inner SGD steps from the shared weights θ (Eq. 2),
    λ more detached steps to the self-motivated target (Eq. 3), the outer loss L_l = mean over the task's 2N
    samples of KL(π(target) ‖ π(θᴷ)), and the hypergradient dL_l/dθ (Eq. 4, by the ``hypergrad`` method).
    It adds dL/dθ (L = mean_l L_l) to each trainable parameter's ``.grad`` as ``loss.backward()`` would; your
    optimizer then applies Eq. 4's outer update with β = its learning rate. ``out`` is a :class:`StepOutput`.

    Args:
        model: an ``nn.Module`` mapping inputs [B, *input_shape] to embeddings [B, d].
        ssl_loss: an :class:`gessl_ext.losses.SSLObjective` or any callable ``loss(z1, z2) -> 0-dim tensor``.
        inner_lr: α of the inner SGD steps (> 0). inner_steps: K ≥ 1. target_steps: λ ≥ 0.
        hypergrad: a method name registered in ``gessl_ext.hypergrad.HYPERGRADIENTS`` ("fd", the paper's
            AID-FD, "hvp", "itd", "first_order", "neumann", "cg"; default settings) or a method instance with
            its own settings, e.g. ``gessl_ext.hypergrad.FD(radius=1e-3)`` or ``gessl_ext.hypergrad.CG(iters=10)``
            (docs/hypergradients.md: which to choose, and ``fd``'s bias on ReLU / max-pool networks).
        head_temperature: τ (> 0) of the default pair-classification head π (cosine similarity / τ); head: a
            custom head ``head(z1, z2) -> log_probs [2N, C]`` (then head_temperature is unused).
        task_batching: "loop" (one task at a time), "vmap" (tasks batched with torch.func.vmap, in chunks of
            ``task_chunk_size``, default all M), or "auto": by device and task size, the loop on the CPU and for
            large tasks, vmap for small ones on an accelerator, in smaller chunks after running out of device memory
            (``gessl_ext.batching``; :meth:`task_batching_for` says what a step runs).
        autocast_dtype: torch.bfloat16 or torch.float16 to run the model's forward passes in low precision; the
            SSL loss, head, KL, parameters, finite differences, hypergradients and every accumulation stay in the
            parameters' dtype (docs/hypergradients.md, "Mixed precision": measured errors, what to choose).
        use_kernels: use the fused custom ops where they apply (CUDA tensors); False forces plain PyTorch.
        warn_nonsmooth: warn (:class:`NonSmoothModelWarning`, once) when ``fd`` meets ReLU-like or max-pool layers.
        process_group: shard the tasks over this torch.distributed group (see gessl_ext.distributed); taken
            from the model when it is wrapped in ``DistributedDataParallel``. Held weakly: the step does not keep a
            group alive after ``torch.distributed.destroy_process_group()`` (and cannot run after it).

    What is trained: the model's trainable parameters and those of the objective (e.g. a BYOL predictor, adapted
    in the inner loop too), so give the optimizer ``step.parameters()``. Frozen parameters and buffers are
    constants of the step.

    BatchNorm: every pass of the inner loop, target, head and hypergradient normalises with the task's own batch
    statistics (its 2N inputs); running statistics are updated by the task's first forward at θ (each call of a
    layer in it), in task order, exactly as M ordinary training steps would leave them. A model in ``eval()``
    mode uses and keeps its running statistics.

    Non-finite values: if L or dL/dθ is not finite, nothing is written (``.grad``, running statistics and
    objective state such as queues stay as they were), ``out.skipped`` is True and ``step.skipped_steps`` (a
    buffer, saved in the state dict) counts it.

    Errors, raised before anything changes: ``TypeError`` for a model that is not an ``nn.Module``, views that are
    not a tensor or have another dtype than the parameters, a non-callable head, a hypergradient class instead of
    an instance, a bad ``autocast_dtype``, a ``process_group`` that is not a ``ProcessGroup``; ``ValueError`` for
    views of the wrong rank, a view axis other than 2, M < 1 or N < 2, views on another device than the model,
    K < 1, λ < 0, non-positive rates or temperatures, an unknown method or ``task_batching``, a model (with
    objective) without trainable parameters, a
    ``torch.compile``d model (also at each call), views made under ``inference_mode``, and, at the first step
    with an input shape, a model output other than one tensor [B, d] or no trainable parameter reaching it;
    ``RuntimeError`` for a step called under ``torch.inference_mode()`` (docs/models.md).
    Settings of a method are validated by the method (``FD(radius=0)`` raises ``ValueError``).

    Cost per task, in gradient passes: K + λ + 1 shared, plus the method's own (``fd``: 2K; ``hvp``: K HVPs;
    ``itd``: K double-backward; ``first_order``: 0).
    """

    def __init__(self, model: nn.Module, ssl_loss, *, inner_lr: float = 0.05, inner_steps: int = 1,
                 target_steps: int = 10, hypergrad: str | Hypergradient = "fd", head_temperature: float = 0.1,
                 head=None, task_batching: str = "auto",
                 task_chunk_size: int | None = None, autocast_dtype: torch.dtype | None = None,
                 use_kernels: bool = True, warn_nonsmooth: bool = True, process_group=None):
        """Validate the settings and bind the objective to the model (see the class docstring)."""
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _refuse_compiled(model)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            process_group = process_group if process_group is not None else model.process_group
            model = model.module
        _check_int("inner_steps", inner_steps, 1)
        _check_int("target_steps", target_steps, 0)
        for name, value in (("inner_lr", inner_lr), ("head_temperature", head_temperature)):
            if not (isinstance(value, (int, float)) and value > 0 and value < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        hypergrad = resolve(hypergrad)
        if task_batching not in TASK_BATCHING:
            raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {task_batching!r}")
        if task_chunk_size is not None:
            _check_int("task_chunk_size", task_chunk_size, 1)
        if head is not None and not callable(head):
            raise TypeError(f"head must be callable head(z1, z2) -> log_probs, got {type(head).__name__}")
        if process_group is not None and not isinstance(process_group, torch.distributed.ProcessGroup):
            raise TypeError("process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group."
                            f"WORLD) or None, got {type(process_group).__name__}")
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
        self.inner_lr, self.inner_steps, self.use_kernels = float(inner_lr), inner_steps, use_kernels
        self.target_steps = target_steps
        self.task_batching = task_batching
        self.task_chunk_size = task_chunk_size
        # A weak reference: the step uses the group while it exists and does not keep it alive past
        # destroy_process_group(); a process holding a destroyed gloo group until exit may abort there.
        self._process_group = None if process_group is None else weakref.ref(process_group)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._reached = (None, [])  # (input key, which parameters the step reaches): set by _check_model
        self._batching_after_oom: dict[tuple, TaskBatching] = {}  # views shape → what "auto" fell back to
        if warn_nonsmooth and isinstance(hypergrad, FD):
            nonsmooth = sorted({type(m).__name__ for m in model.modules() if isinstance(m, NONSMOOTH_LAYERS)})
            if nonsmooth:
                warnings.warn(
                    f"hypergrad='fd' on a model with non-smooth layers ({', '.join(nonsmooth)}): the finite-difference "
                    "Hessian-vector product is biased there and does not converge as its radius -> 0; "
                    "hypergrad='hvp' is exact at a similar cost. Pass warn_nonsmooth=False to silence this.",
                    NonSmoothModelWarning, stacklevel=2,
                )

    # -- public API --

    def forward(self, views: Tensor) -> StepOutput:
        """Run one outer step and accumulate dL/dθ into ``.grad`` (unless skipped). A parameter that neither the
        SSL loss nor the embeddings use keeps its ``.grad`` (None stays None), as with ``loss.backward()``."""
        hypergrad, out = self._hypergradient(views)
        if not out.skipped:
            for p, g in self._reached_grads(hypergrad):
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
        pairs = self._reached_grads(hypergrad)
        with torch.enable_grad():   # differentiable also when called under no_grad, like the step itself
            inner = sum((p * g.to(p.dtype)).sum() for p, g in pairs)
            return out.loss.to(pairs[0][0].dtype) + inner - inner.detach()

    def parameters(self, recurse: bool = True):
        """The trainable parameters the step computes dL/dθ for (the model's and the objective's with
        ``requires_grad``), the ones to give the optimizer; frozen parameters are not listed."""
        return iter(self.task_model.parameters())

    @property
    def process_group(self):
        """The torch.distributed group the tasks are sharded over, or None. Held weakly: ``RuntimeError`` once the
        group object is gone (destroyed by ``torch.distributed.destroy_process_group()`` and held nowhere else;
        while something else, e.g. a DDP wrapper, still holds a destroyed group, torch's own error comes instead)."""
        if self._process_group is None:
            return None
        group = self._process_group()
        if group is None:
            raise RuntimeError("GeSSLStep's process group has been destroyed (torch.distributed.destroy_process_group"
                               "()); build the step again with a live group, or with process_group=None")
        return group

    @property
    def task_batching_used(self) -> str:
        """Deprecated: what ``"auto"`` picks on the model's device for small tasks. ``"auto"`` now depends on the
        task size too; :meth:`task_batching_for` answers for given views."""
        warnings.warn("GeSSLStep.task_batching_used is deprecated: task_batching='auto' now depends on the task size; "
                      "use step.task_batching_for(views)", FutureWarning, stacklevel=2)
        if self.task_batching != "auto":
            return self.task_batching
        return auto_batching(next(iter(self.task_model.parameters())).device, (1,)).mode   # views of the smallest task

    def task_batching_for(self, views: Tensor) -> TaskBatching:
        """How a step runs the tasks of ``views`` [M, 2, N, *input_shape]: ``task_batching`` as set, or what
        ``"auto"`` picks for the model's device and this size (:func:`gessl_ext.batching.auto_batching`; after running
        out of memory at this shape, the smaller chunks it fell back to)."""
        if self.task_batching == "loop":
            return TaskBatching("loop")
        if self.task_batching == "vmap":
            return TaskBatching("vmap", self.task_chunk_size)
        if tuple(views.shape) in self._batching_after_oom:
            return self._batching_after_oom[tuple(views.shape)]
        chosen = auto_batching(next(iter(self.task_model.parameters())).device, views.shape)
        return TaskBatching("vmap", self.task_chunk_size) if chosen.mode == "vmap" else chosen

    # -- internals --

    def _task(self, theta: Tensor, views: Tensor, stats, consts, vmapped):
        """Algorithm 1 for one task: views [2, N, ...] → (dL_l/dθ [P], (L_l, ℓ_l(θ), stats))."""
        problem_type = TaskProblem if vmapped else EagerTaskProblem
        problem = problem_type(self.task_model, views[0], views[1], self.inner_lr, consts, use_kernels=self.use_kernels,
                               differentiates_inner_loop=self.hypergrad.differentiates_inner_loop)
        trajectory, ssl_loss = inner_loop(problem, theta, self.inner_steps, stats or None)
        adapted = problem.adapted(trajectory[-1])
        target = self_motivated_target(problem, adapted, self.target_steps)
        loss, outer_grad = outer_loss_and_grad(adapted, target, self.head)
        del adapted
        if not self.hypergrad.uses_adapted_weights:
            trajectory[-1] = FREED   # θᴷ freed before the method's passes (Hypergradient.uses_adapted_weights)
        hypergrad = self.hypergrad(problem, trajectory, outer_grad)
        return hypergrad.detach(), (loss.detach(), ssl_loss.detach(), stats)

    def _hypergradient(self, views: Tensor):
        """dL/dθ [P] (summed over ranks when distributed) and the StepOutput; updates state unless skipped."""
        self._check_views(views)
        with task_local_batchnorm(self):
            self._check_model(views)
            return self._hypergradient_checked(views)

    def _reached_grads(self, hypergrad: Tensor) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, its slice of dL/dθ) for the parameters the last checked views reach (:meth:`_check_model`)."""
        params = zip(self.task_model.parameters(), self.task_model.spec.unflatten(hypergrad).values(), self._reached[1])
        return [(p, g) for p, g, reached in params if reached]

    def _hypergradient_checked(self, views: Tensor):
        group = self.process_group
        self.ssl_loss.before_step(self.model)
        theta = self.task_model.flat_parameters()
        rank = 0 if group is None else torch.distributed.get_rank(group)
        seed = int(torch.randint(2**62, ())) + (rank << 32)  # task l's random stream: seed + l (randomness.RandomStreams)
        total, (kl, ssl_loss, stats) = self._run_tasks(theta, views, seed)
        if group is not None:
            total, kl, ssl_loss, stats = reduce_across_ranks(total, kl, ssl_loss, stats, group)
            if self.ssl_loss.after_step_needs_all_views:
                views = gather_views(views, group)
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

    def _run_tasks(self, theta: Tensor, views: Tensor, seed: int):
        """:func:`run_tasks` as :meth:`task_batching_for` says; under ``"auto"``, out of device memory with vmap, again
        with half the tasks per vmap call (fresh running-statistics copies, the same random streams) until it fits."""
        batching = first = self.task_batching_for(views)
        while True:
            task_fn = functools.partial(self._task, consts=self.task_model.constants(), vmapped=batching.mode == "vmap")
            stats = per_task_copies(self.task_model.running_stats(), views.shape[0])
            try:
                result = run_tasks(task_fn, theta, views, stats, batching.mode, batching.chunk,
                                   self.task_model.streams, seed)
                break
            except torch.OutOfMemoryError:
                if self.task_batching != "auto" or batching.mode == "loop":
                    raise
            del task_fn, stats   # outside the except clause: the failed attempt's tensors are freed before the next
            batching = batching.halved(views.shape[0])
        if batching != first:
            self._batching_after_oom[tuple(views.shape)] = batching
            warnings.warn(f"GeSSLStep ran out of device memory with task_batching='auto' ({first}) for views of shape "
                          f"{tuple(views.shape)}; this and later steps of that shape run as {batching}. Set "
                          "task_batching and task_chunk_size to choose yourself (docs/performance.md)",
                          UserWarning, stacklevel=_caller_stacklevel())
        return result

    def _check_model(self, views: Tensor) -> None:
        """Before anything changes: refuse compiled models; once per input shape and mode, check the model's
        output and find the parameters the step reaches (``self._reached``)."""
        _refuse_compiled(self.model)
        key = (tuple(views.shape[2:]), views.dtype, views.device, self.model.training)
        if self._reached[0] != key:
            reached = self.task_model.reached_parameters(views[0, 0], views[0, 1])
            if not any(reached):
                raise ValueError("no trainable parameter reaches the model's embeddings or the SSL loss, so the "
                                 "hypergradient is 0: check requires_grad and that forward uses the parameters")
            self._reached = (key, reached)

    def _check_views(self, views) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "GeSSLStep cannot run under torch.inference_mode(): the step differentiates the model (inner SGD steps, "
                "hypergradient), which inference mode forbids. Call it outside inference_mode; under torch.no_grad() "
                "it runs normally")
        if isinstance(views, Tensor) and views.is_inference():
            raise ValueError("views were created under torch.inference_mode() (an inference tensor), which autograd "
                             "cannot save for the step's gradients: create them outside it, or pass views.clone() "
                             "made outside it")
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


_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)  # torch, gessl_ext


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for a warning issued by the calling function, that points at the first frame
    outside gessl_ext and torch: the user's ``step(views)`` or ``step.surrogate(views)`` line."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _refuse_compiled(model: nn.Module) -> None:
    """ValueError if ``model`` or a part of it is compiled with ``torch.compile`` or ``Module.compile()``."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile: absent, nothing is compiled
    if eval_frame is None:
        return
    compiled = [name for name, m in model.named_modules()
                if isinstance(m, eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None]
    if compiled:
        where = ", ".join(repr(n) if n else "the model itself" for n in compiled)
        raise ValueError(
            f"the model is compiled with torch.compile ({where}); GeSSLStep needs the uncompiled module: it runs "
            "the model at per-task weights under torch.func transforms, where compiled code either does not run "
            "(vmap) or cannot be differentiated again or keep its backward graph (hvp, itd, and the shared forward "
            "of the loop, with the aot_eager / inductor backends). Pass the module before compiling it "
            "(torch.compile(m)._orig_mod is m; for m.compile(), build it without that call). docs/models.md")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
