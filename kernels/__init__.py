"""Triton kernels of gessl_ext, one module per kernel (installed as ``gessl_ext.kernels``).

Each module holds the ``@triton.jit`` kernels and plain-Python launchers that take torch tensors;
the custom-op registration that routes CUDA tensors to them lives in ``gessl_ext.ops``.
"""
