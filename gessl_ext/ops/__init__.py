"""gessl_ext custom operators: the fused head KL (Triton) and the FD perturbation (C++/CUDA).

Each op is a ``torch.library`` custom op with a PyTorch implementation for every device, a fast
CUDA implementation where one is available, a fake (meta) implementation, autograd where the op is
differentiated, and a vmap rule. ``kernels_info()`` says which backend serves CUDA tensors here.
"""
import torch

from ._backends import EXTENSION, EXTENSION_ERROR, triton_kernel
from .fd_hvp import fd_perturb, fd_perturb_reference
from .softmax_kl import softmax_kl_from_embeddings, softmax_kl_from_embeddings_reference

__all__ = [
    "fd_perturb", "fd_perturb_reference", "kernels_info", "kernels_summary", "softmax_kl_from_embeddings",
    "softmax_kl_from_embeddings_reference",
]

_EXTENSION_OPS = ("fd_perturb",)


def _backend_choices():
    """{op: (backend, reason it is not the fast one or "")} for CUDA tensors in this process."""
    if not torch.cuda.is_available():
        return {op: ("torch", "no CUDA device") for op in ("softmax_kl",) + _EXTENSION_OPS}
    kernel, triton_error = triton_kernel("softmax_kl")
    info = {"softmax_kl": ("triton", "") if kernel is not None else ("torch", triton_error)}
    for op in _EXTENSION_OPS:
        info[op] = ("cuda", "") if EXTENSION is not None else ("torch", EXTENSION_ERROR)
    return info


def kernels_info():
    """{op name: backend} for CUDA tensors: "triton" / "cuda" (fast kernels) or "torch" (PyTorch reference).

    CPU tensors always take the PyTorch implementation.
    """
    return {op: backend for op, (backend, _) in _backend_choices().items()}


def kernels_summary():
    """Returns (does not print) one line naming each op's backend for CUDA tensors and why an op falls back.

    E.g. ``"gessl_ext ops: softmax_kl=torch, fd_perturb=torch (fallback: no CUDA device)"``;
    ``print(gessl_ext.kernels_summary())`` to show it. :func:`kernels_info` gives the backends as a dict.
    """
    backends = _backend_choices()
    parts = ", ".join(f"{op}={backend}" for op, (backend, _) in backends.items())
    reasons = sorted({reason for _, reason in backends.values() if reason})
    return f"gessl_ext ops: {parts}" + (f" (fallback: {'; '.join(reasons)})" if reasons else "")
