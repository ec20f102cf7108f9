"""Build script for gessl_ext.

The pure-Python package (``gessl_ext``, plus the Triton kernels in ``kernels/``
installed as ``gessl_ext.kernels``) always installs. The C++/CUDA extension in
``csrc/`` is compiled only when ``GESSL_EXT_BUILD_CUDA`` allows it (see
``_want_cuda_extension``); without it every op falls back to its PyTorch path.
"""
import os

from setuptools import find_packages, setup


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

setup(
    name="gessl_ext",
    version="0.1.0",
    description="GeSSL (generalised self-supervised learning) as a drop-in PyTorch training step",
    python_requires=">=3.10",
    packages=find_packages(include=["gessl_ext", "gessl_ext.*"]) + ["gessl_ext.kernels"],
    package_dir={"gessl_ext.kernels": "kernels"},
    install_requires=["torch>=2.4"],
    extras_require={
        "train": ["torchvision>=0.19", "tqdm>=4.60", "matplotlib>=3.5", "scikit-learn>=1.2", "pyyaml>=5.4"],
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "cuda": ["triton>=3.0", "ninja>=1.10", "pybind11>=2.10"],
    },
    entry_points={
        "console_scripts": [
            "gessl-train=gessl_ext.train.cli:train_main",
            "gessl-compare=gessl_ext.train.cli:compare_main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
