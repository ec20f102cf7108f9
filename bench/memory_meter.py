"""A device-independent meter of the peak of live tensor memory during a callable (issue 16).

    with MemoryMeter(breakdown=True) as meter:
        step(views)
    meter.peak_bytes            # peak of live tensor bytes above what was live at entry
    meter.largest_at_peak(10)   # what was live at that moment: op, call site, shape, bytes

Method: a ``TorchDispatchMode`` sees every aten op after autograd, ``torch.func`` transforms and
composite decompositions. Each output tensor whose storage is not yet known was allocated by that op:
its storage's bytes are added to the live total, and ``weakref.finalize`` on the storage's Python object
(which PyTorch keeps alive exactly as long as the C++ storage) subtracts them when the storage is freed.
A storage is counted once however many views share it. Storages that existed before entry and are first
seen as op arguments count as the baseline (0); when one of them is freed inside the block, the live
total drops below the baseline, as ``torch.cuda.memory_allocated()`` would. ``resize_`` / ``out=``
growth of a known storage is added when the op returns.

Why this and not the profiler's memory events: the profiler reports allocator blocks, which on CUDA are
rounded up (512-byte blocks, segment caching) and include kernel-internal scratch (cuDNN workspaces; on
the CPU, im2col and oneDNN buffers), so the same program reports different peaks per device and per
backend. Storage bytes of the op results depend only on the program, so the meter gives the same number
on the CPU and on CUDA for the same sequence of ops, except where a device's kernel returns extra tensors
(cuDNN's training BatchNorm may return a reserve-space buffer where the CPU kernel returns an empty one;
not yet checked on a GPU: tests/bench/test_meters.py has the CUDA comparison without BatchNorm). Where no kernel
uses scratch, the meter equals the CPU allocator's own allocation events exactly (tests/bench/test_meters.py).

Limits: kernel-internal scratch and allocator rounding/fragmentation are not counted
(``torch.cuda.max_memory_allocated`` is larger by those); tensors created outside the dispatcher
(``torch.from_numpy``) appear only when first used by an op; a storage from before entry that no op
inside the block uses is not known, so its free is not subtracted; sparse, nested and meta tensors are
not metered.

Autograd's backward ops run through the same dispatcher (the engine carries the mode to its threads),
so saved activations, gradients and everything a ``torch.func`` transform materialises are counted.
"""
from __future__ import annotations

import itertools
import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dispatch_counters import PACKAGE_ROOT, call_site, tensors_in


@dataclass
class Allocation:
    """One storage created inside the meter: bytes, the aten op that returned it, the shape/dtype of that
    result, the gessl_ext call site (with ``breakdown=True``), and the meter's clock at creation and free
    (``freed`` is None while alive)."""

    nbytes: int
    op: str
    shape: tuple
    dtype: torch.dtype
    site: str
    created: int
    freed: int | None = None


class MemoryMeter(TorchDispatchMode):
    """Peak of live tensor bytes during a ``with`` block, above the bytes live at entry.

    Args:
        breakdown: record the call site of every allocation (slower), for :meth:`largest_at_peak` /
            :meth:`peak_by_site`; the op, shape and bytes are always recorded.
        roots: directories whose frames make up a call site (default: the gessl_ext package).
        depth: frames per call site.

    After the block: ``peak_bytes`` (int), ``end_bytes`` (live at exit above entry; e.g. new ``.grad``),
    ``allocated_bytes`` (sum of all allocations), ``allocations`` (list of :class:`Allocation`).
    A meter can be entered again; each entry starts a new measurement.
    """

    def __init__(self, breakdown: bool = False, roots=(PACKAGE_ROOT,), depth: int = 3):
        super().__init__()
        self.breakdown, self.roots, self.depth = breakdown, tuple(roots), depth
        self._reset()

    def _reset(self):
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocated_bytes = 0
        self.allocations: list[Allocation] = []
        self._peak_clock = 0
        self._clock = itertools.count(1)
        self._known: dict[int, list] = {}  # storage key -> [nbytes, Allocation or None (existed at entry), finalizer]

    def __enter__(self):
        self._reset()
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        for _, _, finalizer in self._known.values():
            finalizer.detach()
        self._known.clear()
        return result

    @property
    def end_bytes(self) -> int:
        return self.live_bytes

    def _freed(self, key: int) -> None:
        nbytes, allocation, _ = self._known.pop(key)
        self.live_bytes -= nbytes
        if allocation is not None:
            allocation.freed = next(self._clock)

    def _track(self, tensor: torch.Tensor, op: str | None) -> None:
        """Register the tensor's storage: new (op given) or existing at entry (op None); a known storage
        that grew (``resize_``) adds its growth."""
        storage = tensor.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        known = self._known.get(key)
        if known is not None:
            if nbytes != known[0]:
                self.live_bytes += nbytes - known[0]
                self.allocated_bytes += max(nbytes - known[0], 0)
                known[0] = nbytes
                if known[1] is not None:
                    known[1].nbytes = nbytes
            return
        allocation = None
        if op is not None:
            site = call_site(self.roots, self.depth) if self.breakdown else ""
            allocation = Allocation(nbytes, op, tuple(tensor.shape), tensor.dtype, site, next(self._clock))
            self.allocations.append(allocation)
            self.live_bytes += nbytes
            self.allocated_bytes += nbytes
        finalizer = weakref.finalize(storage, self._freed, key)
        finalizer.atexit = False
        self._known[key] = [nbytes, allocation, finalizer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tensors_in((args, kwargs)) if t.layout == torch.strided and not t.is_meta]
        name = str(func)
        # torch.tensor(data) fills a tensor outside the dispatcher and then lifts it: it is new
        for tensor in inputs:
            self._track(tensor, name if func is torch.ops.aten.lift_fresh.default else None)
        out = func(*args, **kwargs)
        for tensor in tensors_in(out):
            if tensor.layout == torch.strided and not tensor.is_meta:
                self._track(tensor, name)
        for tensor in inputs:  # out= / resize_ growth
            self._track(tensor, None)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self._peak_clock = next(self._clock)
        return out

    # -- what was live at the peak --

    def live_at_peak(self) -> list[Allocation]:
        """The storages created inside the block and live at the peak, largest first. Their bytes sum to
        ``peak_bytes`` plus the bytes of storages from before entry that had been freed by then."""
        clock = self._peak_clock
        live = [a for a in self.allocations if a.created <= clock and (a.freed is None or a.freed > clock)]
        return sorted(live, key=lambda a: -a.nbytes)

    def largest_at_peak(self, count: int = 10) -> list[Allocation]:
        return self.live_at_peak()[:count]

    def peak_by_site(self) -> list[tuple[str, str, tuple, int, int]]:
        """Live-at-peak storages grouped by (op, call site, shape): rows (op, site, shape, count, bytes),
        largest total first."""
        groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        for a in self.live_at_peak():
            group = groups[(a.op, a.site, a.shape)]
            group[0] += 1
            group[1] += a.nbytes
        return sorted(((*key, n, b) for key, (n, b) in groups.items()), key=lambda row: -row[4])


def measure_peak(fn, *args, breakdown: bool = False, **kwargs):
    """(fn(*args, **kwargs), meter) with the call run inside a :class:`MemoryMeter`."""
    meter = MemoryMeter(breakdown=breakdown)
    with meter:
        result = fn(*args, **kwargs)
    return result, meter
