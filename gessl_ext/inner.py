"""The inner update of GeSSL (Eq. 2) and its derivative products: their one home.

θ' = θ − α∇ℓ(θ), plain SGD (no momentum, no weight decay). Its Jacobian ∂θ'/∂θ = I − αH(θ), H = ∇²ℓ, is
symmetric, so the vector–Jacobian product is uᵀ∂θ'/∂θ = u − αH(θ)u; the implicit (iMAML, proximal)
hypergradient solves (I + αH(θᴷ))x = v. Every user of the update — the step's inner loop and target, each
hypergradient strategy (``fd`` folds its two finite-difference gradients in with :func:`sgd_update_vjp_`), the
evaluation's one-step accuracy and the benchmark baseline — calls the functions here, so changing the inner step
means changing this file.
"""
from __future__ import annotations

import contextlib

import torch

Tensor = torch.Tensor


def sgd_update(theta: Tensor, grad: Tensor, lr: float) -> Tensor:
    """θ − α g (Eq. 2). theta, grad: [..., P] (or any matching shapes), one dtype; lr: α > 0."""
    return torch.add(theta, grad, alpha=-lr)   # one kernel, no temporary α·g


def sgd_update_(theta: Tensor, grad: Tensor, lr: float) -> Tensor:
    """In place, θ ← θ − α g; returns θ. For an iterate nothing else holds (the target's steps after the first)."""
    return theta.add_(grad, alpha=-lr)


def sgd_update_vjp(u: Tensor, hessian_u: Tensor, lr: float) -> Tensor:
    """uᵀ ∂(θ − α∇ℓ(θ))/∂θ = u − αHu, given the Hessian-vector product ``hessian_u`` = Hu (exact or approximate)."""
    return torch.add(u, hessian_u, alpha=-lr)


def sgd_update_vjp_(u: Tensor, hessian_part: Tensor, weight: Tensor, lr: float) -> Tensor:
    """In place, u ← u − α·weight·hessian_part; returns u. Folding the parts of Hu = Σᵢ weightᵢ·partᵢ one at a time
    gives u − αHu without any part outliving its own fold: the central difference (g₊ − g₋)/2ε has parts g₊, g₋
    with weights ±1/2ε. ``weight`` broadcasts against u ([..., 1]: one per task). The product is a temporary of the
    part's size: ``addcmul_`` has no vmap batching rule, and scaling the part in place would scale twice a gradient
    that autograd hands to two parameters as one tensor (a weight used as ``a + b``)."""
    return u.add_(hessian_part * weight, alpha=-lr)


def proximal_matvec(u: Tensor, hessian_u: Tensor, lr: float) -> Tensor:
    """(I + αH) u, the matrix of the implicit (proximal) hypergradient system, given Hu."""
    return torch.add(u, hessian_u, alpha=lr)


class InnerSGD:
    """The inner update and its derivatives for a per-task problem (mixed into :class:`gessl_ext.tasks.TaskProblem`).

    The problem supplies ``inner_lr`` (α), ``grad(θ)`` = ∇ℓ(θ) [P], ``hvp(θ, u)`` = H(θ)u [P],
    ``vjp(fn, θ, cotangent)`` and ``second_order()``; this class builds the loop and its derivative products
    from them. A problem whose gradients come in pieces (one per parameter, without a flat copy) overrides
    :meth:`pieces`, :meth:`grad_pieces`, :meth:`point` and :meth:`point_from_flat`. ``recorded_graph`` is True on a
    problem whose :meth:`recording` makes the inner loop record its autograd graph (one task at a time, for a strategy
    that differentiates the loop); then :meth:`inner_loop_vjp` differentiates that graph, from its output θᴷ (which
    the problem keeps), instead of running the loop again.
    """

    recorded_graph = False

    @contextlib.contextmanager
    def recording(self, theta: Tensor):
        """Context of the inner loop from θ: yields the trajectory [θ⁰] for the loop to append its iterates to, with
        gradients on (also under the caller's ``no_grad``). When the loop's graph is recorded, θ⁰ is a fresh graph
        leaf, attention runs on its twice-differentiable kernel, and the problem keeps the last iterate on exit for
        :meth:`inner_loop_vjp` (the caller may then free its own reference: ``uses_adapted_weights``)."""
        with torch.enable_grad(), self.second_order() if self.recorded_graph else contextlib.nullcontext():
            trajectory = [theta.detach().requires_grad_() if self.recorded_graph else theta]
            yield trajectory
        if self.recorded_graph:
            self._recorded_end = trajectory[-1]

    def pieces(self, flat: Tensor) -> tuple[Tensor, ...]:
        """Views of a flat [P] vector (θ, u, a gradient) in the pieces :meth:`grad_pieces` computes gradients in, or the
        pieces of a :meth:`point`; here one piece, the whole vector."""
        return (flat,)

    def point(self, pieces):
        """The point θ made of ``pieces`` (in :meth:`pieces`' order) without joining them into a flat copy; here the one
        piece itself. :meth:`pieces`, :meth:`grad_pieces`, :meth:`update_`, :meth:`stepped`, ``loss`` and ``embed``
        take a point like a flat θ; ``grad``, ``hvp``, ``update`` and ``vjp`` take a flat θ only."""
        (flat,) = pieces
        return flat

    def point_from_flat(self, flat: Tensor):
        """The point of ``flat`` [P], a fresh vector that nothing else holds (it may be the point's own storage, and is
        written through it), in the form the model runs fastest at; here ``flat`` itself
        (:class:`gessl_ext.tasks.TaskProblem`: per-parameter copies)."""
        return flat

    def stepped(self, theta, grads):
        """A new point (:meth:`point`) θ − αg (Eq. 2), made piece by piece from θ (flat or a point) and g's pieces
        ``grads`` (:meth:`grad_pieces`; ValueError if their count differs): under vmap per-parameter tensors, with
        no flat copy of θ or g; one task at a time the flat vector."""
        parts, grads = self.pieces(theta), tuple(grads)
        if len(grads) != len(parts):
            raise ValueError(f"stepped: {len(grads)} gradient pieces for the {len(parts)} pieces of θ; pass the "
                             "gradient as problem.grad_pieces(θ) gives it, or a flat one as problem.pieces(g)")
        return self.point(tuple(sgd_update(part, grad, self.inner_lr) for part, grad in zip(parts, grads)))

    def grad_pieces(self, theta: Tensor) -> tuple[Tensor, ...]:
        """∇ℓ(θ) in the pieces of :meth:`pieces`, for updating a vector piece by piece (``fd``, :meth:`update_`)."""
        return self.pieces(self.grad(theta))

    def update(self, theta: Tensor, grad: Tensor | None = None) -> Tensor:
        """θ − α∇ℓ(θ) [P]; ``grad`` = ∇ℓ(θ) when already computed."""
        return sgd_update(theta, self.grad(theta) if grad is None else grad, self.inner_lr)

    def update_(self, theta):
        """θ ← θ − α∇ℓ(θ) in place, piece by piece (:meth:`grad_pieces`); θ flat or a :meth:`point`; returns θ. Holds no
        second iterate and, with per-parameter pieces, no flat gradient; for an iterate that no graph and no one else
        holds."""
        for part, grad in zip(self.pieces(theta), self.grad_pieces(theta), strict=True):
            sgd_update_(part, grad, self.inner_lr)
        return theta

    def update_vjp(self, theta: Tensor, u: Tensor) -> Tensor:
        """uᵀ ∂update/∂θ = u − αH(θ)u [P], with the exact Hessian-vector product."""
        return sgd_update_vjp(u, self.hvp(theta, u), self.inner_lr)

    def proximal_matvec(self, theta: Tensor, u: Tensor) -> Tensor:
        """(I + αH(θ)) u [P]."""
        return proximal_matvec(u, self.hvp(theta, u), self.inner_lr)

    def unroll(self, theta: Tensor, steps: int) -> Tensor:
        """θᴷ from θ by ``steps`` differentiable updates."""
        for _ in range(steps):
            theta = self.update(theta)
        return theta

    def inner_loop_vjp(self, trajectory: list[Tensor], cotangent: Tensor) -> Tensor:
        """cotangentᵀ dθᴷ/dθ⁰ [P] for trajectory [θ⁰, …, θᴷ] (θᴷ may be freed): reverse mode through the loop's
        recorded graph (:meth:`recording`), or through :meth:`unroll` run again (K more gradient passes) when the loop
        was not recorded."""
        with self.second_order():
            if self.recorded_graph:
                return torch.autograd.grad(self._recorded_end, trajectory[0], cotangent)[0]
            return self.vjp(lambda theta: self.unroll(theta, len(trajectory) - 1), trajectory[0], cotangent)
