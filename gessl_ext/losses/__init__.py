"""SSL objectives for GeSSLStep (see :mod:`gessl_ext.losses.base` for the protocol)."""
from .barlow_twins import BarlowTwins
from .base import PairObjective, SSLObjective, as_objective
from .byol import BYOL
from .masked_reconstruction import MaskedReconstruction
from .moco import MoCo
from .momentum import MomentumObjective
from .simclr import SimCLR
from .simsiam import SimSiam
from .vicreg import VICReg

__all__ = [
    "SSLObjective",
    "PairObjective",
    "MomentumObjective",
    "as_objective",
    "SimCLR",
    "BarlowTwins",
    "VICReg",
    "SimSiam",
    "BYOL",
    "MoCo",
    "MaskedReconstruction",
]
