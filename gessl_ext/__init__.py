"""gessl_ext: GeSSL (a bi-level, self-motivated wrapper around any SSL objective) as a PyTorch training step."""
from . import distributed, hypergrad, losses
from .allocator import retain_freed_memory
from .head import PairHead
from .hypergrad import HYPERGRADIENTS, register_hypergradient
from .ops import kernels_info, kernels_summary
from .sigma import sigma_measure
from .step import GeSSLStep, NonSmoothModelWarning, StepOutput

__version__ = "0.1.0"

__all__ = ["GeSSLStep", "StepOutput", "NonSmoothModelWarning", "PairHead", "sigma_measure", "losses", "hypergrad", "distributed",
           "HYPERGRADIENTS", "register_hypergradient", "kernels_info", "kernels_summary",
           "retain_freed_memory"]
