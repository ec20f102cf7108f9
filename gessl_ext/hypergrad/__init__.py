"""Hypergradient strategies: one signature, one file each.

Every strategy is a function ``method(problem, trajectory, outer_grad, config) -> hypergrad [P]`` for ONE
task, where ``problem`` offers ``grad(θ)``, ``hvp(θ, v)``, ``vjp(fn, θ, cotangent)`` and a ``second_order()``
context for passes differentiated twice (:class:`gessl_ext.tasks.TaskProblem`; differentiate through ``grad``
only with these, since one task at a time they run on plain autograd),
``trajectory`` is the list [θ⁰ = θ, θ¹, …, θᴷ] of inner iterates (each [P]), ``outer_grad`` is
v = ∂L/∂θᴷ [P], and ``config`` a :class:`HypergradConfig`. The result is dL/dθ for that task.
Strategies run under ``torch.func.vmap``: fixed iteration counts, no ``.item()``, no branching on values.
A strategy that differentiates the inner loop itself sets ``method.differentiates_inner_loop = True``; one
task at a time the trajectory then keeps its graph back to θ⁰ (``itd`` passes ``value=trajectory[-1]`` to
``problem.vjp`` and saves re-running the loop).
"""
from __future__ import annotations

from dataclasses import dataclass

from .first_order import first_order
from .fd import fd
from .hvp import hvp
from .implicit import cg, neumann
from .itd import itd


@dataclass(frozen=True)
class HypergradConfig:
    inner_lr: float
    inner_steps: int
    fd_radius: float = 0.01
    implicit_iters: int = 5
    use_kernels: bool = True


HYPERGRADIENTS = {"itd": itd, "fd": fd, "hvp": hvp, "first_order": first_order, "neumann": neumann, "cg": cg}


def register_hypergradient(name: str, method) -> None:
    """Add a strategy under ``name`` (same signature as the built-ins)."""
    if not callable(method):
        raise TypeError(f"hypergradient method {name!r} must be callable, got {type(method).__name__}")
    HYPERGRADIENTS[name] = method


__all__ = ["HYPERGRADIENTS", "HypergradConfig", "register_hypergradient", "itd", "fd", "hvp", "first_order", "neumann", "cg"]
