"""What every hypergradient method is: a frozen dataclass of its own settings, registered under a name.

A method is called once per task as ``method(problem, trajectory, outer_grad) -> dL_l/dθ [P]``:

* ``problem`` — the task's inner problem (:class:`gessl_ext.tasks.TaskProblem`): ``grad(θ)``, ``hvp(θ, u)``,
  ``grad_pieces(θ)`` (∇ℓ(θ) as a tuple of pieces: one per parameter under vmap, so no flat copy; one piece, the
  flat gradient, one task at a time) with ``pieces(x)`` (a flat vector's views in the same pieces, to zip with it)
  and ``point_from_flat(x)`` (the point of a fresh flat vector x, in the form the model runs fastest at: under vmap
  per-parameter copies, one task at a time x itself; ``grad_pieces``, ``pieces`` and ``update_`` take a point like a
  flat θ, ``grad``, ``hvp`` and ``vjp`` do not), ``vjp(fn, θ, cotangent)``, ``second_order()``, ``inner_lr`` (α),
  ``use_kernels``, and the inner update with its derivative products from :class:`gessl_ext.inner.InnerSGD`
  (``update``, ``update_``, ``stepped``, ``update_vjp``, ``proximal_matvec``, ``unroll``, ``inner_loop_vjp``).
  Differentiate through ``grad`` only with these: one task at a time they run on plain autograd, under ``vmap`` on
  ``torch.func``.
* ``trajectory`` — [θ⁰ = θ, θ¹, …, θᴷ], the inner iterates (each [P]; K = len(trajectory) − 1). For a method
  that declares ``uses_adapted_weights = False`` the step frees θᴷ first and the last entry is :data:`FREED`.
* ``outer_grad`` — v = ∂L_l/∂θᴷ [P], a fresh dense tensor the method owns: it may overwrite it in place.

Methods run under ``torch.func.vmap``: fixed iteration counts, no ``.item()``, no branching on tensor values.
What a method needs from the step is stated by its class attributes :attr:`Hypergradient.differentiates_inner_loop`
and :attr:`Hypergradient.uses_adapted_weights`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

Tensor = torch.Tensor

HYPERGRADIENTS: dict[str, type["Hypergradient"]] = {}


class FreedAdaptedWeights:
    """What a method with ``uses_adapted_weights = False`` finds at ``trajectory[-1]``: θᴷ was freed before it ran.
    Using it raises an error that says so (torch's own errors name this class)."""

    def __getattr__(self, name):
        raise RuntimeError("trajectory[-1] (θᴷ) was freed before this hypergradient method ran, because its class has "
                           "uses_adapted_weights = False (perhaps inherited from FD, HVP, ITD or FirstOrder); a method "
                           "that reads θᴷ must set uses_adapted_weights = True")

    def __repr__(self):
        return "FREED"


FREED = FreedAdaptedWeights()


def setting(default, help: str, *, minimum: float | None = None, inclusive: bool = True):
    """A method setting: a dataclass field with its help text (for ``--help`` and the docs) and, for a number, its
    lower bound (``inclusive``: may equal it), checked when the method is constructed."""
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum, "inclusive": inclusive})


@dataclasses.dataclass(frozen=True)
class Hypergradient:
    """Base class of the hypergradient methods (``GeSSLStep(hypergrad=...)``).

    Subclass it as a frozen dataclass whose fields are the method's settings (declared with :func:`setting`),
    implement ``__call__(problem, trajectory, outer_grad)``, and register it with :func:`register_hypergradient`.
    Settings are validated once, at construction: ``ValueError`` / ``TypeError`` naming the setting.
    """

    #: The name it is registered under (set by :func:`register_hypergradient`).
    name: ClassVar[str] = ""
    #: True when the method takes reverse-mode derivatives through the inner loop itself (``itd``). The step then
    #: records the loop's autograd graph one task at a time, and under vmap runs BatchNorm / InstanceNorm with input
    #: statistics as :func:`gessl_ext.batch_norm.normalize` (torch's fused double backward has no batching rule;
    #: ``hvp`` keeps torch's kernels). Methods that only use ``grad`` and ``hvp`` (forward-over-reverse) leave it
    #: False.
    differentiates_inner_loop: ClassVar[bool] = False
    #: False when the method never reads θᴷ = ``trajectory[-1]`` (``fd`` and ``hvp`` use θ⁰ … θᴷ⁻¹ only; ``itd``
    #: reaches it only through ``inner_loop_vjp``, from the recorded graph the problem keeps): the step then frees it
    #: before the method's passes, one per-task parameter copy less at their memory peak. A plain class attribute (an
    #: annotated one would be a dataclass field, a setting); subclasses inherit it.
    uses_adapted_weights: ClassVar[bool] = True

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), type(field.default)
            label = f"{type(self).__name__}.{field.name}"
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                         or (kind is int and not isinstance(value, int))):
                raise TypeError(f"{label} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
            minimum, inclusive = field.metadata.get("minimum"), field.metadata.get("inclusive", True)
            if kind in (int, float) and minimum is not None:
                if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
                    bound = f"{'>=' if inclusive else '>'} {minimum:g}"
                    raise ValueError(f"{label} must be a finite number {bound}, got {value!r} "
                                     f"(default {field.default!r}: {field.metadata['help']})")

    def __call__(self, problem, trajectory: list[Tensor], outer_grad: Tensor) -> Tensor:
        """dL_l/dθ [P] for one task from its problem, inner iterates [θ⁰, …, θᴷ] and v = ∂L_l/∂θᴷ [P] (the
        protocol in :mod:`gessl_ext.hypergrad.base`); same dtype and device as ``outer_grad``."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(problem, trajectory, outer_grad)")

    @classmethod
    def settings(cls) -> list[dataclasses.Field]:
        """The method's settings (dataclass fields with ``metadata['help']``)."""
        return list(dataclasses.fields(cls))


def register_hypergradient(name: str, method: type[Hypergradient] | None = None):
    """Register a :class:`Hypergradient` subclass under ``name``; usable as ``@register_hypergradient("name")``.

    Registered methods are accepted by ``GeSSLStep(hypergrad=name)`` and reachable from ``gessl-train --hypergrad``
    with their settings as ``--<name>-<setting>`` flags (``_`` written as ``-``).
    """
    def add(cls):
        # the class itself must be a dataclass: a subclass without @dataclass inherits the marker, not its fields
        if not (isinstance(cls, type) and issubclass(cls, Hypergradient) and "__dataclass_fields__" in vars(cls)):
            raise TypeError(f"hypergradient method {name!r} must be a dataclass subclass of "
                            f"gessl_ext.hypergrad.Hypergradient, got {cls!r}; write your strategy as "
                            "@register_hypergradient(name) @dataclass(frozen=True) class M(Hypergradient): ...")
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"hypergradient name must be a Python identifier, got {name!r}")
        undeclared = [f.name for f in dataclasses.fields(cls)
                      if "help" not in f.metadata or type(f.default) not in (bool, int, float, str)]
        if undeclared:
            raise TypeError(f"{cls.__name__}: declare each setting with gessl_ext.hypergrad.setting(default, help, "
                            "minimum=...) and a bool, int, float or str default, so it is validated and reachable "
                            f"from gessl-train; not so: {undeclared}")
        previous = HYPERGRADIENTS.get(name)
        if previous is not None and (previous.__module__, previous.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"a hypergradient method is already registered as {name!r} ({previous.__qualname__}); "
                             "choose another name")
        cls.name = name
        HYPERGRADIENTS[name] = cls
        return cls

    return add if method is None else add(method)


def resolve(hypergrad) -> Hypergradient:
    """A method instance from a registered name (default settings) or an instance (returned as is)."""
    if isinstance(hypergrad, Hypergradient):
        return hypergrad
    if isinstance(hypergrad, type) and issubclass(hypergrad, Hypergradient):
        raise TypeError(f"hypergrad must be a method instance or name, got the class {hypergrad.__name__}; "
                        f"instantiate it: {hypergrad.__name__}()")
    if isinstance(hypergrad, str) and hypergrad in HYPERGRADIENTS:
        return HYPERGRADIENTS[hypergrad]()
    raise ValueError(f"unknown hypergrad {hypergrad!r}; choose one of {sorted(HYPERGRADIENTS)} "
                     "or pass an instance such as gessl_ext.hypergrad.FD(radius=0.01)")


def settings_table() -> str:
    """Markdown table of every registered method and its settings (docs/hypergradients.md embeds it)."""
    rows = ["| `hypergrad=` | class | settings (default) |", "|---|---|---|"]
    for name, cls in HYPERGRADIENTS.items():
        settings = "; ".join(f"`{f.name}` = {f.default!r}: {f.metadata['help']}" for f in cls.settings()) or "—"
        rows.append(f"| `\"{name}\"` | `{cls.__name__}` | {settings} |")
    return "\n".join(rows)
