"""The optional C++/CUDA extension of gessl_ext; everything else is declared in pyproject.toml.

The pure-Python package (``gessl_ext``, plus the Triton kernels in ``kernels/`` installed as
``gessl_ext.kernels``) always installs. The extension ``gessl_ext._C`` (csrc/) is compiled only when
``GESSL_EXT_BUILD_CUDA`` allows it (see ``_want_cuda_extension``); without it every op falls back to
its PyTorch path. A build that should see the installed torch needs ``pip install --no-build-isolation``.
"""
import os

from setuptools import setup


def _want_cuda_extension():
    """Decide whether to compile csrc/ (README, "Custom kernels and the CUDA build")."""
    choice = os.environ.get("GESSL_EXT_BUILD_CUDA", "auto").lower()
    if choice in ("0", "off", "false", "no"):
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False
    have_toolkit = torch.version.cuda is not None and CUDA_HOME is not None
    if choice in ("1", "on", "true", "yes"):
        if not have_toolkit:
            raise RuntimeError("GESSL_EXT_BUILD_CUDA=1 but no CUDA build of torch or no CUDA toolkit was found")
        return True
    # auto: compile where a GPU is visible, so CPU-only installs never need a compiler.
    return have_toolkit and torch.cuda.is_available()


def _extensions():
    """The gessl_ext._C CUDA extension (csrc/*.cpp, csrc/*.cu), or nothing when it is not wanted.

    Set TORCH_CUDA_ARCH_LIST (e.g. "9.0") for a forced build on a machine without a GPU; otherwise
    torch compiles for every architecture it knows, which is slow.
    """
    if not _want_cuda_extension():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".cpp", ".cu")))
    headers = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".h", ".cuh")))
    ext = CUDAExtension(
        "gessl_ext._C",
        sources,
        depends=headers,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
