"""Which fast backends this process can use, and helpers shared by the op registrations.

- The C++/CUDA extension ``gessl_ext._C`` (built from csrc/ by setup.py) registers
  ``torch.ops.gessl_ext_C.*`` for CUDA tensors; it is loaded once here, in a try/except.
- Triton kernels are imported lazily (only when a CUDA tensor reaches them or ``kernels_info`` asks on
  a CUDA machine), from ``gessl_ext.kernels`` when installed, else from the repository's kernels/.
"""
import functools
import importlib
import importlib.util
import math
import sys
from pathlib import Path

import torch


def _load_extension():
    try:
        from gessl_ext import _C  # noqa: F401  (importing registers torch.ops.gessl_ext_C)
    except ImportError as exc:
        return None, f"C++/CUDA extension not built ({exc})"
    return torch.ops.gessl_ext_C, ""


EXTENSION, EXTENSION_ERROR = _load_extension()


@functools.cache
def triton_kernel(name):
    """(module, "") for kernels/<name>.py, or (None, reason) when Triton or the module cannot be imported."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    qualified = f"gessl_ext.kernels.{name}"
    try:
        return importlib.import_module(qualified), ""
    except ModuleNotFoundError as exc:
        if exc.name not in ("gessl_ext.kernels", qualified):
            return None, f"cannot import {qualified} ({exc})"
    path = Path(__file__).resolve().parents[2] / "kernels" / f"{name}.py"
    if not path.is_file():
        return None, f"{qualified} is not installed and {path} does not exist"
    spec = importlib.util.spec_from_file_location(qualified, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        del sys.modules[qualified]
        return None, f"cannot import {path} ({exc})"
    return module, ""


def accumulation_dtype(dtype):
    """float64 for float64 inputs, float32 for every other floating dtype (fp32 accumulation)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rows(t):
    """[..., P] -> [prod(...), P] (a view when possible; safe for P == 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def batch_to_front(batch_size, in_dims, args):
    """vmap rule helper: each tensor's vmapped dim moved to 0, unbatched tensors expanded to batch_size.

    Every op here treats all leading dims as independent rows/tasks, so after this the op is simply
    called once on the physical tensors and its outputs are batched at dim 0.
    """
    moved = []
    for arg, dim in zip(args, in_dims):
        if not isinstance(arg, torch.Tensor):
            moved.append(arg)
        elif dim is None:
            moved.append(arg.expand(batch_size, *arg.shape))
        else:
            moved.append(arg.movedim(dim, 0))
    return moved


def check_float_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")


def check_same_layout(name, t, ref_name, ref):
    """t must match ref in shape, dtype and device."""
    check_float_tensor(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_finite_scalar(name, value, positive=False, nonzero=False):
    """value as a float: TypeError unless a Python number (not bool), ValueError unless finite (and > 0 / nonzero)."""
    kind = "finite positive" if positive else "finite nonzero" if nonzero else "finite"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a {kind} Python number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0) or (nonzero and value == 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ' and nonzero' if nonzero else ''}, "
                         f"got {value}")
    return float(value)
