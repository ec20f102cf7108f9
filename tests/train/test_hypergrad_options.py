"""gessl-train's hypergradient options come from the registry: every registered method and its settings."""
import argparse
import dataclasses
import importlib
import types

import pytest

from gessl_ext.hypergrad import CG, FD, HYPERGRADIENTS, Hypergradient, register_hypergradient, setting
from gessl_ext.train import config


def parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.resolve(vars(parser.parse_args(argv)))


def test_built_in_settings_reach_the_method():
    cfg = parse(config, ["--hypergrad", "cg", "--cg-iters", "7", "--fd-radius", "0.5"])
    assert config.build_hypergradient(cfg) == CG(iters=7)
    assert config.build_hypergradient({**cfg, "hypergrad": "fd"}) == FD(radius=0.5)


def test_a_setting_the_method_rejects_is_a_config_error_naming_it():
    with pytest.raises(config.ConfigError, match="--hypergrad fd: FD.radius must be a finite number > 0"):
        parse(config, ["--fd-radius", "0"])


@dataclasses.dataclass(frozen=True)
class Scaled(Hypergradient):
    scale: float = setting(2.0, "factor", minimum=0.0)

    def __call__(self, problem, trajectory, outer_grad):
        return self.scale * outer_grad


@pytest.mark.parametrize("how", ["registered before import", "entry point"])
def test_a_method_registered_by_the_user_is_reachable_with_its_settings(how, monkeypatch):
    if how == "entry point":   # an installed plugin names a module whose import registers the method
        entry = types.SimpleNamespace(load=lambda: register_hypergradient("scaled", Scaled))
        monkeypatch.setattr(importlib.metadata, "entry_points",
                            lambda group: [entry] if group == config.HYPERGRAD_PLUGINS else [])
    else:
        register_hypergradient("scaled", Scaled)
    try:
        fresh = importlib.reload(config)
        cfg = parse(fresh, ["--hypergrad", "scaled", "--scaled-scale", "3"])
        assert fresh.build_hypergradient(cfg) == Scaled(scale=3.0)
    finally:
        HYPERGRADIENTS.pop("scaled", None)
        monkeypatch.undo()
        importlib.reload(config)
