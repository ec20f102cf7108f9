"""The hypergradient registry: one signature, per-method settings validated in one place, custom methods.
(Loop, vmap and chunked vmap agreeing for every built-in method: tests/test_step.py.)"""
import dataclasses
import inspect

import pytest
import torch

from gessl_ext import HYPERGRADIENTS, GeSSLStep, losses, register_hypergradient
from gessl_ext.hypergrad import CG, FD, HVP, ITD, FirstOrder, Hypergradient, Neumann, resolve, setting, settings_table
from hypergrad_test_utils import smooth_mlp, step_hypergradient

SIMCLR = losses.SimCLR(temperature=0.5)
BUILT_INS = ("fd", "hvp", "itd", "first_order", "neumann", "cg")
STEP = dict(inner_lr=0.05, inner_steps=2, target_steps=2, head_temperature=0.1)


def built(name):
    """The built-in method with 3 iterations for the implicit solvers (keeps the tests fast)."""
    cls = HYPERGRADIENTS[name]
    return cls(iters=3) if cls in (Neumann, CG) else cls()


def test_every_registered_method_is_a_frozen_dataclass_with_the_strategy_signature():
    assert list(HYPERGRADIENTS)[:len(BUILT_INS)] == list(BUILT_INS)
    for name, cls in HYPERGRADIENTS.items():
        assert issubclass(cls, Hypergradient) and cls.name == name
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        parameters = list(inspect.signature(cls.__call__).parameters)
        assert parameters == ["self", "problem", "trajectory", "outer_grad"], name
        for field in cls.settings():
            assert field.metadata["help"], (name, field.name)


@pytest.mark.parametrize("bad, error, words", [
    (lambda: FD(radius=0.0), ValueError, "FD.radius must be a finite number > 0, got 0.0"),
    (lambda: FD(radius=float("nan")), ValueError, "FD.radius"),
    (lambda: FD(radius="0.1"), TypeError, "FD.radius must be a number"),
    (lambda: CG(iters=0), ValueError, "CG.iters must be a finite number >= 1"),
    (lambda: Neumann(iters=2.0), TypeError, "Neumann.iters must be an integer"),
    (lambda: Neumann(iters=True), TypeError, "Neumann.iters must be an integer"),
])
def test_settings_are_validated_at_construction_naming_the_setting(bad, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(".", r"\.")):
        bad()


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FD().radius = 1.0


def test_names_and_instances_resolve_and_bad_ones_name_the_fix():
    assert resolve("fd") == FD() and resolve(FD(radius=0.5)).radius == 0.5
    with pytest.raises(ValueError, match="choose one of .*hvp.*FD\\(radius=0.01\\)"):
        GeSSLStep(smooth_mlp(), SIMCLR, hypergrad="hessian")
    with pytest.raises(TypeError, match="instantiate it: FD\\(\\)"):
        GeSSLStep(smooth_mlp(), SIMCLR, hypergrad=FD)


@pytest.mark.parametrize("not_a_method", [3, "fd", lambda problem, trajectory, outer_grad: outer_grad, FirstOrder()])
def test_register_rejects_anything_but_a_hypergradient_dataclass(not_a_method):
    with pytest.raises(TypeError, match="dataclass subclass of gessl_ext.hypergrad.Hypergradient"):
        register_hypergradient("broken", not_a_method)
    assert "broken" not in HYPERGRADIENTS


def test_a_registered_method_with_its_own_setting_is_used_by_the_step():
    @register_hypergradient("scaled_first_order")
    @dataclasses.dataclass(frozen=True)
    class ScaledFirstOrder(Hypergradient):
        scale: float = setting(2.0, "factor", minimum=0.0)

        def __call__(self, problem, trajectory, outer_grad):
            return self.scale * outer_grad

    try:
        model = smooth_mlp()
        views = torch.randn(2, 2, 5, 6, dtype=torch.float64)
        plain, _ = step_hypergradient(model, views, SIMCLR, hypergrad="first_order", **STEP)
        scaled, _ = step_hypergradient(model, views, SIMCLR, hypergrad=ScaledFirstOrder(scale=3.0), **STEP)
        by_name, _ = step_hypergradient(model, views, SIMCLR, hypergrad="scaled_first_order", **STEP)
        assert "scaled_first_order" in settings_table()
        with pytest.raises(ValueError, match="ScaledFirstOrder.scale"):
            ScaledFirstOrder(scale=-1.0)
    finally:
        del HYPERGRADIENTS["scaled_first_order"]
    assert torch.allclose(scaled, 3 * plain, rtol=1e-14, atol=0)
    assert torch.allclose(by_name, 2 * plain, rtol=1e-14, atol=0)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("method", BUILT_INS)
def test_written_grads_carry_no_autograd_graph(method, batching):
    """.grad must be a plain tensor, as after backward(): a graph attached to it would keep every activation
    of the step alive until the next zero_grad."""
    model = smooth_mlp(batchnorm=True)
    GeSSLStep(model, SIMCLR, hypergrad=built(method), task_batching=batching, **STEP)(
        torch.randn(2, 2, 5, 6, dtype=torch.float64))
    assert not any(p.grad.requires_grad or p.grad.grad_fn is not None for p in model.parameters())


def test_the_docs_list_every_registered_method_with_its_settings():
    """docs/hypergradients.md embeds ``settings_table()``; regenerate it with
    ``python -c "from gessl_ext.hypergrad import settings_table; print(settings_table())"``."""
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "hypergradients.md").read_text()
    assert settings_table() in docs


def test_register_names_what_a_custom_method_must_declare():
    @dataclasses.dataclass(frozen=True)
    class PlainField(Hypergradient):
        scale: float = 0.5     # not declared with setting(...): no help text, no bound

        def __call__(self, problem, trajectory, outer_grad):
            return self.scale * outer_grad

    class NotADataclass(FirstOrder):   # inherits the dataclass marker, not fields of its own
        pass

    @dataclasses.dataclass(frozen=True)
    class ListSetting(FirstOrder):
        scales: tuple = setting((1.0,), "per-layer factors")   # no gessl-train flag can carry it

    with pytest.raises(TypeError, match=r"declare each setting with gessl_ext.hypergrad.setting.*\['scale'\]"):
        register_hypergradient("plain_field", PlainField)
    with pytest.raises(TypeError, match=r"bool, int, float or str default.*\['scales'\]"):
        register_hypergradient("list_setting", ListSetting)
    with pytest.raises(TypeError, match="must be a dataclass subclass"):
        register_hypergradient("not_a_dataclass", NotADataclass)
    with pytest.raises(ValueError, match="already registered as 'fd'"):
        register_hypergradient("fd", Neumann)
    assert HYPERGRADIENTS["fd"] is FD and not {"plain_field", "not_a_dataclass", "list_setting"} & set(HYPERGRADIENTS)
    assert float(PlainField()(None, None, torch.ones(1))) == 0.5   # unregistered, it still constructs


@pytest.mark.parametrize("base", [HVP, ITD])
def test_a_method_that_reads_freed_adapted_weights_is_told_why(base):
    """A subclass of HVP or ITD inherits uses_adapted_weights = False, so the step frees θᴷ, with tasks batched or not
    (one task at a time ITD's recorded graph keeps θᴷ inside the problem); reading it names the cause (one task at a
    time: the placeholder's own message; under vmap: torch's error names the placeholder)."""
    @dataclasses.dataclass(frozen=True)
    class AtAdaptedWeights(base):
        def __call__(self, problem, trajectory, outer_grad):
            return problem.hvp(trajectory[-1], outer_grad)

    views = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="uses_adapted_weights = False.*must set uses_adapted_weights = True"):
        GeSSLStep(smooth_mlp(), SIMCLR, task_batching="loop", hypergrad=AtAdaptedWeights())(views)
    with pytest.raises(Exception, match="FreedAdaptedWeights"):
        GeSSLStep(smooth_mlp(), SIMCLR, task_batching="vmap", hypergrad=AtAdaptedWeights())(views)
    declared = dataclasses.dataclass(frozen=True)(type("Declared", (AtAdaptedWeights,), {"uses_adapted_weights": True}))
    model = smooth_mlp()
    GeSSLStep(model, SIMCLR, task_batching="vmap", hypergrad=declared())(views)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
