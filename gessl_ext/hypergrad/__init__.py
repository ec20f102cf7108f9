"""Hypergradient methods: one file each, one signature, each with its own settings, registered by name.

``GeSSLStep(hypergrad="fd")`` uses a method's default settings; ``GeSSLStep(hypergrad=FD(radius=1e-3))`` sets
them. The protocol every method follows is in :mod:`gessl_ext.hypergrad.base`; docs/hypergradients.md
compares them.
"""
from .base import FREED, HYPERGRADIENTS, Hypergradient, register_hypergradient, resolve, setting, settings_table
from .fd import FD  # noqa: I001  (import order = registry order = the order the CLI and docs list them)
from .hvp import HVP
from .itd import ITD
from .first_order import FirstOrder
from .implicit import Neumann, CG

__all__ = ["FREED", "HYPERGRADIENTS", "Hypergradient", "register_hypergradient", "resolve", "setting", "settings_table",
           "FirstOrder", "FD", "HVP", "ITD", "Neumann", "CG"]
