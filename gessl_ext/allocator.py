"""An opt-in glibc malloc setting that makes CPU training passes cheaper (process-wide).

By default glibc returns large freed blocks to the operating system (``munmap`` above a dynamic
mmap threshold, heap trimming above a trim threshold). A training pass frees its activations at the
end and allocates them again in the next pass, so every pass page-faults them back in. On the 2-core
benchmark machine that costs 15–20 % of a plain forward+backward pass and of a GeSSL step alike
(docs/performance.md). Raising both thresholds keeps the freed memory for reuse: the same effect as
starting Python with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set, or using jemalloc /
tcmalloc through ``LD_PRELOAD``.

``gessl_ext`` never changes this on its own; ``gessl-train`` does on the CPU (``--no-retain-freed-memory``
turns it off), and the CPU benchmarks do for every implementation they compare.
"""
from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MIB = 1 << 20
MAX_THRESHOLD_MIB = 2047  # mallopt takes a C int (bytes)


def retain_freed_memory(mmap_threshold_mib: int = 128, trim_threshold_mib: int = 512) -> bool:
    """Keep freed memory in the process for reuse instead of returning it to the OS (glibc only).

    Blocks smaller than ``mmap_threshold_mib`` come from the heap instead of fresh mappings, and the heap
    is trimmed only when more than ``trim_threshold_mib`` at its top is free. It applies to every later
    allocation of the process, turns off glibc's dynamic thresholds, and keeps resident memory near its
    peak between passes. Returns True when glibc accepted both settings, False where the C library is
    not glibc (macOS, Windows, musl: nothing changed) or an older glibc refused a threshold.
    """
    for name, value in (("mmap_threshold_mib", mmap_threshold_mib), ("trim_threshold_mib", trim_threshold_mib)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_THRESHOLD_MIB:
            raise ValueError(f"{name} must be an integer number of MiB in [1, {MAX_THRESHOLD_MIB}], got {value!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap_ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold_mib * MIB)
    trim_ok = mallopt(M_TRIM_THRESHOLD, trim_threshold_mib * MIB)
    return bool(mmap_ok and trim_ok)
