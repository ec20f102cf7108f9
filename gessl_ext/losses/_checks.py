"""Constructor-argument validation shared by the objectives (clear ValueErrors naming the argument)."""
import math
from numbers import Real


def _is_real(value):
    return isinstance(value, Real) and not isinstance(value, bool)


def check_positive(name, value):
    """Require a finite real number > 0."""
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_nonnegative(name, value):
    """Require a finite real number >= 0."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_unit_interval(name, value, *, open_interval=False):
    """Require 0 <= value <= 1 (or 0 < value < 1 with ``open_interval``)."""
    inside = _is_real(value) and (0 < value < 1 if open_interval else 0 <= value <= 1)
    if not inside:
        bounds = "0 < {} < 1" if open_interval else "0 <= {} <= 1"
        raise ValueError(f"{name} must satisfy {bounds.format(name)}, got {value!r}")
    return float(value)


def check_positive_int(name, value):
    """Require an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_embedding_pair(z1, z2, *, min_batch=1):
    """Require two embedding batches of equal shape [N, d] with N >= ``min_batch`` (static shapes only)."""
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"embeddings must be two tensors of equal shape [N, d], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < min_batch:
        raise ValueError(f"this objective needs at least {min_batch} samples per view, got N={z1.shape[0]}")
