"""The protocol between GeSSLStep and an SSL objective.

``GeSSLStep`` calls an objective as ``objective(embed, x1, x2)`` once per task, inside
``torch.func.functional_call`` (so the task-adapted weights of the model *and* of the
objective's own trainable parameters, e.g. a predictor, are swapped in), possibly under
``torch.func.vmap`` over tasks and nested ``grad`` / ``jvp`` / ``vjp``. Therefore ``forward``
must be a pure tensor function: no ``.item()``, no Python branching on tensor values, no
in-place writes to module state or captured tensors, and no randomness (random state such as
masks lives in buffers that are resampled in :meth:`SSLObjective.after_step`).

Stateful objectives (momentum networks, queues) create their state in :meth:`SSLObjective.bind`
as submodules / buffers, so it is part of ``state_dict()``. ``GeSSLStep`` binds its objective in
its constructor: construct the ``GeSSLStep`` before calling ``load_state_dict`` on it.
"""
from collections.abc import Callable

import torch
from torch import Tensor, nn


class SSLObjective(nn.Module):
    """Base class of every self-supervised objective used by GeSSLStep.

    Set the class attribute ``embeds_views_once = True`` when ``forward`` calls ``embed`` exactly once,
    on ``torch.cat([x1, x2])``: one task at a time, GeSSLStep then takes the head's embeddings at the
    adapted weights from the loss pass instead of running the model again (checked at run time).
    """

    embeds_views_once: bool = False
    #: True when :meth:`after_step` must see the views of all M tasks of the step, also those other ranks ran
    #: (a queue of keys); a distributed step then all-gathers the views for it. False: it gets this rank's views.
    after_step_needs_all_views: bool = False

    def forward(self, embed: Callable[[Tensor], Tensor], x1: Tensor, x2: Tensor) -> Tensor:
        """Return the scalar (0-dim) SSL loss of one task.

        embed: maps inputs [B, *input_shape] to embeddings [B, d] (the task-adapted model).
        x1, x2: the task's two views, each [N, *input_shape].
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward(embed, x1, x2)")

    def bind(self, model: nn.Module) -> None:
        """Called once by ``GeSSLStep.__init__`` with the online model (create momentum copies etc.)."""

    def before_step(self, model: nn.Module) -> None:
        """Called at the start of every outer step (momentum / EMA updates from the current weights)."""

    def after_step(self, model: nn.Module, views: Tensor) -> None:
        """Called once per outer step after the hypergradient (queue updates, resampling of random state).
        views [M, 2, N, *input_shape]: every rank's tasks when ``after_step_needs_all_views``, else this rank's."""


class PairObjective(SSLObjective):
    """An objective that only needs the embeddings of the two views.

    ``forward`` embeds both views in ONE call, ``embed(cat([x1, x2]))`` over the 2N images, so
    BatchNorm layers of the model normalise with statistics of the whole task (both views).
    """

    embeds_views_once = True

    def pair_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Scalar loss from the embeddings z1, z2 [N, d] of the two views."""
        raise NotImplementedError(f"{type(self).__name__} must implement pair_loss(z1, z2)")

    def forward(self, embed, x1, x2):
        z1, z2 = embed(torch.cat([x1, x2])).chunk(2)
        return self.pair_loss(z1, z2)


class CallablePairObjective(PairObjective):
    """Wraps a plain ``loss_fn(z1, z2) -> scalar`` (e.g. another library's NT-Xent module).

    An ``nn.Module`` loss is registered as a submodule, so its parameters and buffers belong to
    the objective (trained by GeSSLStep's optimizer, saved in ``state_dict``).
    """

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.loss_fn = loss_fn

    def pair_loss(self, z1, z2):
        loss = self.loss_fn(z1, z2)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"the wrapped loss {self.loss_fn!r} must return a 0-dim tensor, got {shape}")
        return loss

    def extra_repr(self):
        return "" if isinstance(self.loss_fn, nn.Module) else f"loss_fn={self.loss_fn!r}"


def as_objective(loss) -> SSLObjective:
    """Return ``loss`` if it is an :class:`SSLObjective`; wrap a callable ``loss(z1, z2) -> scalar``
    in a :class:`PairObjective`; raise TypeError for anything else."""
    if isinstance(loss, SSLObjective):
        return loss
    if isinstance(loss, type):
        raise TypeError(f"ssl_loss must be an objective or loss instance, got the class {loss.__qualname__}; instantiate it")
    if callable(loss):
        return CallablePairObjective(loss)
    raise TypeError(
        f"ssl_loss must be an SSLObjective or a callable loss(z1, z2) -> scalar, got {type(loss).__name__}: {loss!r}"
    )
