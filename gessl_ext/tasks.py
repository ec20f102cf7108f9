"""The batched task model: the network and the SSL objective as functions of flat parameters.

Every per-task quantity in a GeSSL step (inner gradients, Hessian-vector products, embeddings) is a
function of one flat parameter vector θ [P]. A task's code is written once, for one task, and
:func:`run_tasks` maps it over the M tasks either one at a time (``"loop"``) or in chunks with
``torch.func.vmap`` (``"vmap"``). The task's derivatives come from a problem object with one protocol
and two implementations: :class:`TaskProblem` (``torch.func`` transforms, which compose with vmap)
and :class:`EagerTaskProblem` (plain ``torch.autograd``, cheaper one task at a time).

BatchNorm rule: every pass of the inner loop, the target, the head and the hypergradient normalises
with the task's own batch statistics and leaves running statistics alone. Running statistics are
updated by the task's first forward at the shared weights θ (both views together, 2N inputs; every
call of a layer in it), in task order, exactly as M ordinary training steps on the M task batches would leave
them (:func:`fold_running_stats`); InstanceNorm layers with running statistics follow the same rule. A model
in ``eval()`` mode uses and keeps its running statistics.

Random layers (Dropout, stochastic depth, …): every pass of a task replays that task's random stream
(:class:`RandomStreams`). Layers that torch cannot batch over tasks, differentiate twice, or replay run as
substitutes with the same function (:meth:`TaskModel._substitutes`; docs/models.md).
"""
from __future__ import annotations

import collections
import contextlib
import functools
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import functional_call, jvp, vjp, vmap

from .inner import InnerSGD
from .layers import (LOWERED_LAYERS, NORM_LAYERS, layer_in_low_precision, layer_substitutes, network_under_autocast,
                     norm_in_dtype, recording_statistics, recurrent_forward, running_stats_frozen,
                     substituted, substituted_norms, tracked_norms, update_running_stats, wrapped_forwards)
from .losses.momentum import MomentumObjective
from .randomness import RandomStreams, fork_rng

Tensor = torch.Tensor

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")   # a tracked norm layer's, in this order


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
            return self.embed(torch.cat([x1, x2])).chunk(2)
        if what == "loss":
            return self.objective(self.embed, x1, x2)
        embedded = []

        def embed(x):
            embedded.append(self.embed(x))
            return embedded[-1]

        loss = self.objective(embed, x1, x2)
        if len(embedded) != 1 or embedded[0].shape[0] != 2 * x1.shape[0]:
            shapes = [tuple(z.shape) for z in embedded]
            raise RuntimeError(
                f"{type(self.objective).__name__} sets embeds_views_once = True but its forward called embed "
                f"{len(embedded)} time(s) (outputs {shapes}); it must call embed(torch.cat([x1, x2])) exactly once, "
                "or set embeds_views_once = False")
        return (loss, *embedded[0].chunk(2))


    def embed(self, x: Tensor) -> Tensor:
        """The model's embeddings [B, d] of inputs x [B, *input_shape] (checked: :func:`checked_embedding`)."""
        return checked_embedding(self.model(x), x.shape[0])


@contextlib.contextmanager
def _own_tensors_restored(modules):
    """Put each module's own parameters and buffers back on exit. ``torch.func.functional_call`` does not for a module
    that sits under two names (a layer used twice): it swaps the tensors in under each name and on exit restores the
    second name's "original", which is the tensor it swapped in under the first, leaving the module with a non-leaf
    parameter (torch 2.14)."""
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in modules]
    try:
        yield
    finally:
        for m, parameters, buffers in saved:
            m._parameters.update(parameters)
            m._buffers.update(buffers)


def checked_embedding(z, batch: int) -> Tensor:
    """``z`` if it is an embedding [B, d] of B = ``batch`` inputs; else a ValueError naming what it is and the fix."""
    if not isinstance(z, Tensor):
        raise ValueError(
            f"the model must return its embeddings as one Tensor [B, d]; it returned a {type(z).__name__}. For a "
            "model with several outputs (tuple, dict, ModelOutput), give GeSSLStep a wrapper module whose forward "
            "returns the embedding, e.g. `return self.model(x)[0]` or `return self.model(x)['pooler_output']` "
            "(docs/models.md)")
    if z.dim() == 2 and z.shape[0] == batch:
        return z
    if z.dim() < 2 or z.shape[0] != batch:
        fix = ("return [B, 1], e.g. z.unsqueeze(1)" if z.dim() == 1 and z.shape[0] == batch else
               "the first axis must be the batch axis (e.g. batch_first=True for a recurrent layer, no transpose)")
    else:
        fix = "flatten or pool the extra axes, e.g. end the model with nn.Flatten() (after a pooling layer)"
    raise ValueError(f"the model must map inputs [B, *input_shape] to embeddings [B, d]; for B = {batch} inputs it "
                     f"returned shape {list(z.shape)}: {fix}")


class TaskModel:
    """The model + SSL objective as pure functions of flat trainable parameters θ [P].

    Frozen parameters and buffers are read from the modules at call time (constants).
    """

    def __init__(self, model: nn.Module, objective: nn.Module, autocast_dtype: torch.dtype | None = None):
        self.joint = _Joint(model, objective)
        trainable = {n: p for n, p in self.joint.named_parameters() if p.requires_grad}
        self.spec = FlatParams(trainable)
        self.autocast_dtype = autocast_dtype
        self._tracked = list(tracked_norms(self.joint).values())
        self._batch_instance_norms = [m for m in self.joint.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        self._recurrent = [m for m in self.joint.modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]
        self._norms = [m for m in self.joint.modules() if isinstance(m, NORM_LAYERS)]
        momentum = objective.momentum_network if isinstance(objective, MomentumObjective) else None
        self._networks = [model] + ([momentum] if momentum is not None else [])
        self._lowered = [m for net in self._networks for m in net.modules() if type(m) in LOWERED_LAYERS]
        self.tracked_norms = {f"model.{n}": m for n, m in tracked_norms(model).items()}
        self.stat_names = [f"{n}.{b}" for n in self.tracked_norms for b in _STAT_BUFFERS]
        self.streams = RandomStreams()
        self._layer_substitutes = layer_substitutes(self.joint)
        self._attention = [m for m in self.joint.modules() if isinstance(m, nn.MultiheadAttention) and m.dropout > 0]
        calls = collections.Counter(id(m) for _, m in self.joint.named_modules(remove_duplicate=False))
        self._reused = [m for m in self.joint.modules() if calls[id(m)] > 1]

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

    def call(self, theta: Tensor | dict[str, Tensor], x1: Tensor, x2: Tensor, what: str, consts,
             reversed_twice=False, record: list | None = None):
        """Run the joint module at θ (flat [P], or its per-parameter pieces as :meth:`FlatParams.unflatten` gives them)
        on one task; running statistics are left alone. With a ``record`` list, the model's tracked norm layers append
        the statistics they would fold in (:func:`recording_statistics`), for :meth:`update_running_stats` to apply
        after the pass (outside any gradient transform, which refuses in-place writes to captured tensors).

        ``reversed_twice`` (a pass differentiated twice in reverse mode under vmap) runs every BatchNorm /
        InstanceNorm with input statistics as :func:`gessl_ext.batch_norm.normalize`. Recurrent layers run as
        :func:`recurrent_forward`; random draws replay the task's stream (:class:`RandomStreams`).
        """
        params = theta if isinstance(theta, dict) else self.spec.unflatten(theta)
        state, dtype = {**consts, **params}, next(iter(params.values())).dtype
        recording = recording_statistics(self.tracked_norms, record) if record is not None else contextlib.nullcontext()
        with running_stats_frozen(self._tracked), self._substitutes(reversed_twice), self.streams.replay(x1.device), \
                self._mixed_precision(dtype), recording, _own_tensors_restored(self._reused):
            return functional_call(self.joint, state, (x1, x2), {"what": what}, strict=False)

    def update_running_stats(self, stats: dict[str, Tensor], names: list[str], statistics) -> None:
        """Fold the statistics recorded by a pass (:meth:`call` with ``record``: layer ``names`` and their (mean,
        variance)) into the running-statistics copies ``stats`` in place, in call order, as the layers would have."""
        for name, (mean, var) in zip(names, statistics):
            update_running_stats(self.tracked_norms[name], mean, var, [stats[f"{name}.{b}"] for b in _STAT_BUFFERS])

    @contextlib.contextmanager
    def _mixed_precision(self, dtype: torch.dtype):
        """Autocast as a pass runs it (nothing when ``autocast_dtype`` is None; enter after the substitutes).

        The model, and an objective's momentum copy of it, run under autocast and return their outputs in
        ``dtype``, the parameters' dtype; their Linear and convolution layers run in the autocast dtype explicitly
        (:func:`layer_in_low_precision`) and their normalisation layers in ``dtype`` (:func:`norm_in_dtype`),
        so that ``vmap`` computes as the loop does. Everything computed from the embeddings (the SSL loss, a
        predictor or decoder, the head and the outer KL) runs in ``dtype``: these turn small differences between
        nearby embeddings into gradients, which the rounding of a bf16 similarity matrix would swamp
        (docs/hypergradients.md, "Mixed precision").
        """
        if self.autocast_dtype is None:
            yield
            return
        low = self.autocast_dtype
        with wrapped_forwards(self._norms, lambda m, f: functools.partial(norm_in_dtype, dtype, f)), \
                wrapped_forwards(self._lowered, lambda m, f: functools.partial(layer_in_low_precision, low, m, f)), \
                wrapped_forwards(self._networks,
                                  lambda m, f: functools.partial(network_under_autocast, low, dtype, f)):
            yield

    def reached_parameters(self, x1: Tensor, x2: Tensor) -> list[bool]:
        """Which trainable parameters (``parameters()`` order) the SSL loss or the embeddings of the task (x1, x2)
        depend on: the autograd graph of one plain pass of each at the current weights, running statistics and the
        caller's random state untouched. A parameter that reaches neither gets no gradient from a step, as from
        ``loss.backward()``. The pass also checks the model's output (:func:`checked_embedding`)."""
        params = self.parameters()
        with fork_rng(x1.device), torch.enable_grad(), running_stats_frozen(self._tracked), self._substitutes(False):
            if self.embeds_views_once:
                outputs = self.joint(x1, x2, "loss_and_embed")
            else:
                outputs = (self.joint(x1, x2, "loss"), *self.joint(x1, x2, "embed"))
            outputs = [o for o in outputs if o.requires_grad]
            if not outputs:
                return [False] * len(params)
            grads = torch.autograd.grad(sum(o.sum() for o in outputs), params, allow_unused=True)
        return [g is not None for g in grads]

    @contextlib.contextmanager
    def _substitutes(self, reversed_twice: bool):
        """Layers that run as a substitute in a pass: norm layers (:func:`substituted_norms`), recurrent layers
        (:func:`recurrent_forward`), others (:func:`layer_substitutes`); and attention on its math
        kernel whenever an ``nn.MultiheadAttention`` applies dropout, so that every pass of a task draws the
        same attention masks (each fused kernel draws them its own way; passes differentiated twice need math)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(substituted_norms(self._batch_instance_norms, reversed_twice))
            stack.enter_context(substituted(self._recurrent, recurrent_forward))
            for layers, forward in self._layer_substitutes:
                stack.enter_context(substituted(layers, forward))
            if any(m.training for m in self._attention):
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield

    @property
    def embeds_views_once(self) -> bool:
        """True when the objective's loss pass embeds cat(x1, x2) once, so that forward can serve the head too."""
        return bool(getattr(self.joint.objective, "embeds_views_once", False))


class TaskProblem(InnerSGD):
    """One task's inner problem ℓ(θ; x1, x2) with its derivatives, θ [P], by ``torch.func`` transforms.

    This is the protocol the hypergradient strategies use (``gessl_ext.hypergrad``): ``grad``, ``hvp``,
    ``vjp``, ``second_order``, ``inner_lr``, ``use_kernels``, and from :class:`gessl_ext.inner.InnerSGD` the
    inner update and its derivative products. These transforms compose with ``vmap`` (tasks batched);
    :class:`EagerTaskProblem` computes the same quantities with plain ``torch.autograd`` one task at a time.

    ``differentiates_inner_loop``: the strategy will take reverse-mode derivatives through the inner loop
    (``Hypergradient.differentiates_inner_loop``). Its passes then run BatchNorm / InstanceNorm with input statistics
    as :func:`gessl_ext.batch_norm.normalize`, since torch's fused double backward has no batching rule; all but
    :meth:`hvp`'s, which differentiate in forward mode, which that function has no rule for and torch's kernels
    batch. ``use_kernels``: fused custom ops allowed.
    """

    def __init__(self, task_model: TaskModel, x1: Tensor, x2: Tensor, inner_lr: float, consts, *,
                 differentiates_inner_loop: bool = False, use_kernels: bool = False):
        self.task_model, self.x1, self.x2, self.inner_lr, self.consts = task_model, x1, x2, inner_lr, consts
        self.use_kernels = use_kernels
        self.reversed_twice = differentiates_inner_loop

    def call(self, theta: Tensor | dict[str, Tensor], what: str, record: list | None = None):
        return self.task_model.call(theta, self.x1, self.x2, what, self.consts, self.reversed_twice, record)

    def loss(self, theta: Tensor | dict[str, Tensor]) -> Tensor:
        return self.call(theta, "loss")

    def embed(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Embeddings of both views at θ: ([N, d], [N, d])."""
        return self.call(theta, "embed")

    # -- differentiation primitives (overridden by EagerTaskProblem) --

    def grad_and_value(self, fn: Callable, theta: Tensor, has_aux: bool = False):
        """(∇_θ fn(θ) [P], fn(θ)) for a scalar fn; with ``has_aux``, fn returns (value, aux) and this (grad, value, aux).
        θ may also be its per-parameter pieces (a name → tensor dict), and the gradient then comes in the same pieces.

        By the pullback of ``torch.func.vjp``, called once (:func:`_pull_back`), not ``torch.func.grad_and_value``,
        which records its backward for a further derivative and so keeps every activation's gradient alive until it
        returns, one more activation set at the end of each pass (bench/memory_meter.py; same values).
        """
        value, pullback, *aux = vjp(fn, theta, has_aux=has_aux)
        return (_pull_back(pullback, torch.ones_like(value)), value, *aux)

    def vjp(self, fn: Callable, theta: Tensor, cotangent: Tensor) -> Tensor:
        """cotangentᵀ ∂fn/∂θ [P] for fn: [P] → [P]."""
        return _pull_back(vjp(fn, theta)[1], cotangent)

    def hvp(self, theta: Tensor, v: Tensor) -> Tensor:
        """Exact Hessian-vector product ∇²ℓ(θ) v [P], forward-over-reverse (jvp of the gradient): under vmap
        it is faster than double backward and works with BatchNorm, whose double backward does not batch.

        The gradient is taken per parameter (:meth:`grad_pieces`) and only the tangent is made flat, after the
        gradient itself is dropped: a flat gradient would concatenate both the gradient and its tangent inside the
        transform, two more per-task parameter copies at the peak of an ``hvp`` step (bench/memory_meter.py)."""
        spec = self.task_model.spec
        with self.second_order(), self._norms_in_forward_mode():
            return self._unit_scaled(lambda u: spec.flatten(jvp(self.grad_pieces, (theta,), (u,))[1]), v)

    @contextlib.contextmanager
    def _norms_in_forward_mode(self):
        """Context of passes differentiated in forward mode: norm layers on torch's kernels, which have a batched
        forward-mode rule, even for a strategy that also reverses the inner loop twice (``reversed_twice``)."""
        reversed_twice, self.reversed_twice = self.reversed_twice, False
        try:
            yield
        finally:
            self.reversed_twice = reversed_twice

    def _unit_scaled(self, linear: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        """``linear(v)`` for a linear map; under autocast computed as ‖v‖ · linear(v / ‖v‖), the scaling in the
        parameters' dtype, so that the low-precision passes see a unit vector whatever the size of v: the
        iterates of ``neumann`` / ``cg`` / the ``hvp`` recursion grow or shrink geometrically, and fp16 (largest
        value 65504) overflows on them (``fd`` scales the same way: ε = r / ‖u‖)."""
        if self.task_model.autocast_dtype is None:
            return linear(v)
        scale = torch.linalg.vector_norm(v).clamp_min(torch.finfo(v.dtype).tiny)
        return linear(v / scale) * scale

    @staticmethod
    def second_order():
        """Context for passes differentiated twice: attention on its composite (math) kernel, since the
        fused attention kernels have neither a double-backward nor a forward-mode rule."""
        return sdpa_kernel(SDPBackend.MATH)

    # -- built on the primitives --

    def grad(self, theta: Tensor) -> Tensor:
        """∇ℓ(θ) [P]."""
        return self.grad_and_value(self.loss, theta)[0]

    def grad_pieces(self, theta: Tensor | dict[str, Tensor]) -> tuple[Tensor, ...]:
        """∇ℓ(θ) for θ [P] or a :meth:`point`, as one tensor per parameter: the values of ``grad(θ)`` without the flat
        copy that concatenates them (a per-task parameter copy at the end of each pass)."""
        params = theta if isinstance(theta, dict) else self.task_model.spec.unflatten(theta)
        return tuple(self.grad_and_value(self.loss, params)[0].values())

    def pieces(self, flat: Tensor | dict[str, Tensor]) -> tuple[Tensor, ...]:
        """Views of a flat [P] vector (θ, u, a gradient), one per parameter, shaped like it (:meth:`grad_pieces`); or
        the pieces of a :meth:`point`."""
        return tuple((flat if isinstance(flat, dict) else self.task_model.spec.unflatten(flat)).values())

    def point(self, pieces) -> dict[str, Tensor]:
        """θ as its per-parameter pieces in :meth:`pieces`' order (a name → tensor dict, no copy; InnerSGD.point says
        what takes one)."""
        return dict(zip(self.task_model.spec.names, pieces, strict=True))

    def point_from_flat(self, flat: Tensor) -> dict[str, Tensor]:
        """Per-parameter copies of a fresh flat vector [P] that nothing else holds (it is freed): under vmap each
        parameter of a flat [M, P] is a slice strided by P, which a batched convolution copies in every pass and keeps
        for its backward, one more per-task parameter copy at the pass's peak (bench/memory_meter.py)."""
        return self.point(tuple(piece.clone() for piece in self.pieces(flat)))

    def grad_and_loss(self, theta: Tensor, stats=None) -> tuple[Tensor, Tensor]:
        """(∇ℓ(θ) [P], ℓ(θ)); BatchNorm ``stats`` copies, if given, take this pass's running-stat update: the pass
        records the statistics, returned as the gradient's auxiliary output, and the copies take them after it
        (:meth:`TaskModel.update_running_stats`)."""
        if not stats:
            return self.grad_and_value(self.loss, theta)
        names = []

        def loss_and_statistics(theta):
            records = []
            loss = self.call(theta, "loss", records)
            names[:] = [name for name, _, _ in records]
            return loss, [(mean, var) for _, mean, var in records]

        grad, loss, statistics = self.grad_and_value(loss_and_statistics, theta, has_aux=True)
        self.task_model.update_running_stats(stats, names, statistics)
        return grad, loss

    def adapted(self, theta: Tensor) -> "AdaptedPoint":
        """The adapted weights θᴷ, where the target's first step and the outer loss both evaluate the model."""
        return AdaptedPoint(self, theta)


def _pull_back(pullback: Callable, cotangent):
    """The one call of a ``torch.func.vjp`` pullback, its graph freed as the backward goes: the pullback keeps it by
    default (``retain_graph=True``, for calling it again), and with it every saved activation until the pass
    returns, under the backward's own temporaries and gradients (bench/memory_meter.py: 1.67 → 1.41× a plain step for
    ``fd`` on ResNet-18 32px, M = 8, N = 32; same values)."""
    return pullback(cotangent, retain_graph=False)[0]


class AdaptedPoint:
    """The model at the adapted weights θᴷ: ``ssl_grad_pieces()`` = ∇ℓ(θᴷ) in the problem's pieces (for the target's
    first step) and ``outer_grad_and_value(outer)`` = (∂/∂θᴷ, value) of ``outer(z1, z2)`` on the embeddings at θᴷ.
    Here each is its own pass; :class:`EagerTaskProblem` shares one forward between them."""

    def __init__(self, problem: TaskProblem, theta: Tensor):
        self.problem, self.theta = problem, theta

    def ssl_grad_pieces(self) -> tuple[Tensor, ...]:
        return self.problem.grad_pieces(self.theta)

    def outer_grad_and_value(self, outer: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        return self.problem.grad_and_value(lambda theta: outer(*self.problem.embed(theta)), self.theta)


class EagerTaskProblem(TaskProblem):
    """:class:`TaskProblem` by plain ``torch.autograd``, for one task at a time (``task_batching="loop"``).

    Same values as the ``torch.func`` version without its per-operation dispatch overhead (≈5 % of a
    gradient pass of the CPU benchmark convnet), and the adapted point shares one forward between the
    target's first step and the outer loss (docs/performance.md). A gradient is itself differentiable
    (``create_graph``) exactly when θ requires grad, which is how ``vjp`` and ``hvp`` differentiate it. For a
    strategy that differentiates the inner loop, the loop records its graph (``recorded_graph``), which the
    strategy then differentiates instead of running the loop again.
    """

    def __init__(self, *args, differentiates_inner_loop: bool = False, use_kernels: bool = False):
        super().__init__(*args, use_kernels=use_kernels)
        self.recorded_graph = differentiates_inner_loop

    def grad_and_value(self, fn, theta, has_aux=False):
        differentiable = theta.requires_grad
        x = theta if differentiable else theta.detach().requires_grad_()
        with torch.enable_grad():
            value, *aux = fn(x) if has_aux else (fn(x),)
            (grad_x,) = torch.autograd.grad(value, x, create_graph=differentiable)
        return (grad_x, value if differentiable else value.detach(), *aux)

    # One piece, the flat gradient (and a point is the flat θ): one task at a time no copy is worth saving, and one
    # kernel per update beats one per parameter (the loop is launch-bound on a GPU).
    pieces, grad_pieces = InnerSGD.pieces, InnerSGD.grad_pieces
    point, point_from_flat = InnerSGD.point, InnerSGD.point_from_flat

    def vjp(self, fn, theta, cotangent):
        x = theta.detach().requires_grad_()
        with torch.enable_grad():
            return torch.autograd.grad(fn(x), x, cotangent)[0]

    def hvp(self, theta, v):
        """∇²ℓ(θ) v by double backward: vᵀ∇²ℓ = (∇²ℓ v)ᵀ since the Hessian is symmetric."""
        with self.second_order():
            return self._unit_scaled(lambda u: self.vjp(self.grad, theta, u), v)

    def adapted(self, theta):
        if not self.task_model.embeds_views_once:
            return AdaptedPoint(self, theta)
        return _SharedForwardPoint(self, theta)


class _SharedForwardPoint(AdaptedPoint):
    """One forward at θᴷ yields ℓ and the embeddings; its graph serves both backward passes. ``ssl_grad_pieces``
    must come first (it keeps the graph; ``outer_grad_and_value`` frees it)."""

    def __init__(self, problem: EagerTaskProblem, theta: Tensor):
        super().__init__(problem, theta)
        self.leaf = theta.detach().requires_grad_()
        with torch.enable_grad():
            self.loss, self.z1, self.z2 = problem.call(self.leaf, "loss_and_embed")

    def ssl_grad_pieces(self):
        return self.problem.pieces(torch.autograd.grad(self.loss, self.leaf, retain_graph=True)[0])

    def outer_grad_and_value(self, outer):
        with torch.enable_grad():
            value = outer(self.z1, self.z2)
            (grad_theta,) = torch.autograd.grad(value, self.leaf)
        return grad_theta, value.detach()


_VMAP_LIMITS = ("randomness", "Batching rule not implemented", "we do not yet support")
"""Words of torch's errors for operations vmap cannot batch (e.g. a random draw in place into a fresh tensor)."""


def run_tasks(task_fn: Callable, theta: Tensor, views: Tensor, stats: dict[str, Tensor], batching: str,
              chunk_size: int | None, streams: RandomStreams | None = None, seed: int | None = None):
    """Map ``task_fn(theta, views_l, stats_l) -> (hypergrad [P], aux)`` over the M tasks.

    ``batching="loop"`` runs one task at a time; ``"vmap"`` runs chunks of ``chunk_size`` tasks (all M
    when None) as one ``torch.func.vmap`` call. Returns (Σ_l hypergrad_l [P], aux stacked over tasks).
    ``streams``/``seed``: task l (or the chunk starting at l) replays the random stream ``seed + l``
    (:class:`RandomStreams`); without them random draws are not replayed.
    """
    num_tasks = views.shape[0]
    chunk = 1 if batching == "loop" else (chunk_size or num_tasks)
    # A BatchNorm counter is read with float() when momentum is None, which vmap cannot batch; every
    # task's counter holds the same value, so the vmapped tasks share one unbatched copy.
    stat_dims = {n: None if n.endswith("num_batches_tracked") else 0 for n in stats}
    batched_fn = vmap(task_fn, in_dims=(None, 0, stat_dims), randomness="different")
    total, auxes = None, []
    for start in range(0, num_tasks, chunk):
        part = slice(start, start + chunk)
        replay = streams.seeded(seed + start) if streams is not None and seed is not None else contextlib.nullcontext()
        with replay:
            if batching == "loop":
                hypergrad, aux = task_fn(theta, views[start], {n: s[start] for n, s in stats.items()})
                aux = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), aux)
            else:
                stats_part = {n: s[part] if stat_dims[n] == 0 else s[start].clone() for n, s in stats.items()}
                try:
                    hypergrad, aux = batched_fn(theta, views[part], stats_part)
                except RuntimeError as error:
                    if not any(words in str(error) for words in _VMAP_LIMITS):
                        raise
                    raise RuntimeError(f"{error}\n\nA layer of the model cannot run under torch.func.vmap over tasks "
                                       "(above): task_batching='loop' runs the tasks one at a time without vmap "
                                       "(docs/models.md)") from error
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

    Each task's copy started from the current statistics r0 and took the k_l updates of the task's first pass
    (k_l > 1 when a layer runs more than once, e.g. an objective that embeds x1 and x2 separately). With a
    momentum m they scale r by (1 − m)^k_l and add copy_l − (1 − m)^k_l r0, replayed here task after task; with
    momentum None (BatchNorm's cumulative average, which does not depend on order) task l added the batch
    statistics summing to copy_l (n0 + k_l) − n0 r0, n0 the batches counted before. BatchNorm counts the batches
    in ``num_batches_tracked``; InstanceNorm, like torch's, leaves its counter alone. No host-device sync.
    """
    if not per_task:
        return
    buffers = dict(task_model.joint.named_buffers())
    for name, norm in task_model.tracked_norms.items():
        instance = isinstance(norm, nn.modules.instancenorm._InstanceNorm)
        momentum = norm.momentum if norm.momentum is not None or not instance else 0.0
        count = buffers[f"{name}.num_batches_tracked"]
        ran = per_task[f"{name}.num_batches_tracked"] - count     # [M]: updates each task's first pass made
        for stat in ("running_mean", "running_var"):
            r0, copies = buffers[f"{name}.{stat}"], per_task[f"{name}.{stat}"]
            updates = ran.to(r0.dtype).view(-1, *[1] * r0.dim())
            if momentum is None:
                before = count.to(r0.dtype)
                seen = before + updates.sum(0)
                added = (copies * (before + updates) - before * r0).sum(0)
                r0.copy_(torch.where(seen > 0, (before * r0 + added) / seen.clamp_min(1), r0))
            else:
                decay = (1 - momentum) ** updates
                running = r0.clone()
                for scale, contribution in zip(decay, copies - decay * r0):
                    running.mul_(scale).add_(contribution)
                r0.copy_(running)
        if not instance:
            count.add_(ran.sum())
