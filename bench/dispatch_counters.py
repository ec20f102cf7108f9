"""What one call dispatches: an aten op counter and a host-device synchronisation counter (issue 16).

Both are ``TorchDispatchMode``s, so they see every aten op at the bottom of the dispatcher, after
autograd, ``torch.func`` transforms (vmap, grad, jvp) and composite decompositions have run: what
they count is what a device would execute, and the same program gives the same counts on the CPU
and on CUDA (up to ops whose kernels differ per device, e.g. a fused CUDA-only path).

* :class:`OpCounter` counts ops by overload name and splits them into *kernels* (ops that write
  memory: a fresh output storage, an in-place or ``out=`` argument, or a scalar read back) and
  *aliasing* ops (views, ``detach``, ``_unsafe_view``: metadata only, no device kernel). The kernel
  count is the device-independent proxy for kernel launches. It also records the memory format of
  the input of every convolution, to see whether channels-last inputs stay channels-last.
* :class:`SyncCounter` records every op that forces the host to wait for the device, with the
  Python call site: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``
  — ``bool`` dispatches ``aten.is_nonzero``, which reaches the mode as ``_local_scalar_dense``),
  ``aten.is_nonzero`` / ``aten.item`` / ``aten.equal`` where a backend dispatches them whole, ops
  whose output shape depends on tensor values (``nonzero``, ``masked_select``, ``unique``, boolean
  indexing, ``repeat_interleave`` with a tensor of repeats and no ``output_size``, ``bincount``), and
  blocking copies from a CUDA tensor to the CPU. Composite ops are seen as what they decompose into
  (``F.one_hot`` on the CPU: two ``.item()`` range checks). It keeps apart the reads of values that
  need no device data (made by factory ops inside the block), which a GPU run keeps on the host.

Limits: ops that never reach the dispatcher are not seen (``Tensor.tolist()`` and ``numpy()`` read
CPU memory directly, so on a CPU program they are invisible; on CUDA they need a device→host copy,
which is seen); nor are kernel-internal launches (one aten op can be several CUDA kernels).
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

import gessl_ext

PACKAGE_ROOT = str(Path(gessl_ext.__file__).resolve().parent)
_SCALAR_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                 torch.ops.aten.item.default, torch.ops.aten.equal.default}
_CONVOLUTIONS = {torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default}


def call_site(roots=(PACKAGE_ROOT,), depth: int = 3) -> str:
    """The innermost ``depth`` Python frames whose file lies under one of ``roots`` (default: the
    gessl_ext package), innermost first, as ``"tasks.py:212 call < step.py:204 _task"``; "" if none."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None and len(frames) < depth:
        filename = frame.f_code.co_filename
        if filename.startswith(roots):
            frames.append(f"{Path(filename).name}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(frames)


def tensors_in(tree) -> list[torch.Tensor]:
    """The tensors among the leaves of a pytree (op arguments or results)."""
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of the tensor's storage (its StorageImpl address), shared by all its views."""
    return tensor.untyped_storage()._cdata


def writes_an_argument(func) -> bool:
    """True for in-place and ``out=`` overloads (the schema marks an argument as written)."""
    return any(arg.alias_info is not None and arg.alias_info.is_write for arg in func._schema.arguments)


def memory_format(tensor: torch.Tensor) -> str:
    """"channels_last", "contiguous" or "strided" (anything else); a 4-D tensor that is both (1×1 spatial,
    or one channel) counts as channels_last."""
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous" if tensor.is_contiguous() else "strided"


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside ``with OpCounter() as ops:``.

    ``ops.counts``: Counter of overload names (e.g. ``"aten.convolution.default"``); ``ops.total``,
    ``ops.kernels`` (ops that write memory), ``ops.aliasing`` (= total − kernels);
    ``ops.conv_input_formats``: Counter of (op name, memory format of its first tensor argument).
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.kernel_counts: Counter[str] = Counter()
        self.conv_input_formats: Counter[tuple[str, str]] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def kernels(self) -> int:
        return sum(self.kernel_counts.values())

    @property
    def aliasing(self) -> int:
        return self.total - self.kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = tensors_in((args, kwargs))
        out = func(*args, **kwargs)
        name = str(func)
        self.counts[name] += 1
        outputs = tensors_in(out)
        input_storages = {storage_key(t) for t in inputs if t.layout == torch.strided}
        fresh = any(t.layout == torch.strided and storage_key(t) not in input_storages for t in outputs)
        if fresh or not outputs or writes_an_argument(func):
            self.kernel_counts[name] += 1
        if func in _CONVOLUTIONS:
            self.conv_input_formats[(func.overloadpacket.__name__, memory_format(inputs[0]))] += 1
        return out


@dataclass(frozen=True)
class SyncEvent:
    """One host-device synchronisation: the aten op, why it syncs, and its gessl_ext call site."""

    op: str
    reason: str
    site: str


def sync_reason(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` makes the host wait for the device, or None if it does not."""
    if func in _SCALAR_READS:
        return "reads a tensor value into Python"
    packet = func.overloadpacket
    if packet is torch.ops.aten.index:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "boolean-mask indexing: output shape depends on the mask"
        return None
    if packet is torch.ops.aten.repeat_interleave:
        return None if kwargs.get("output_size") is not None else "repeat_interleave without output_size"
    if torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags:
        return "output shape depends on tensor values"
    if packet in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
        tensors = tensors_in((args, kwargs))
        if packet is torch.ops.aten.copy_:
            to_cpu = tensors[0].device.type == "cpu"
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        else:
            to_cpu = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
            non_blocking = kwargs.get("non_blocking", False)
        if to_cpu and any(t.is_cuda for t in tensors) and not non_blocking:
            return "device-to-host copy"
    return None


class SyncCounter(TorchDispatchMode):
    """Records the host-device synchronisations inside ``with SyncCounter() as syncs:`` as ``syncs.events``
    (a list of :class:`SyncEvent`); ``syncs.count`` = len(events); ``syncs.by_site()`` = Counter of
    (op, reason, site).

    Run on the CPU, every tensor is a host tensor, so the counter tells apart the values that need no device
    data: tensors made inside the block by factory ops (``torch.randint(n, ())``, ``torch.tensor(3.0)``,
    ``torch.eye``) and whatever is computed from such tensors only. Tensors that existed before the block
    (parameters, inputs, buffers) and everything computed from them are device data. A read of a value
    that needs no device data is recorded in ``syncs.host_reads``, not counted: on an accelerator it is
    either a host tensor (no sync) or a constant made on the device (a sync that the CPU cannot tell
    from the former). Under ``torch.compile`` both are graph breaks, and under CUDA-graph capture the
    value read is frozen.
    """

    def __init__(self, roots=(PACKAGE_ROOT,), depth: int = 4):
        super().__init__()
        self.roots, self.depth = tuple(roots), depth
        self.events: list[SyncEvent] = []
        self.host_reads: list[SyncEvent] = []
        self._host = WeakTensorKeyDictionary()  # CPU tensors that would stay on the host

    @property
    def count(self) -> int:
        return len(self.events)

    def by_site(self, events=None) -> Counter:
        return Counter((e.op, e.reason, e.site) for e in (self.events if events is None else events))

    def _host_only(self, tensors) -> bool:
        return all(t.device.type == "cpu" and t in self._host for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = tensors_in((args, kwargs))
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            event = SyncEvent(str(func), reason, call_site(self.roots, self.depth))
            host = reason != "device-to-host copy" and self._host_only(inputs)
            (self.host_reads if host else self.events).append(event)
        out = func(*args, **kwargs)
        # torch.tensor(data) (lifted) and factory ops make constants; ops on constants only keep them so
        host = func is torch.ops.aten.lift_fresh.default or self._host_only(inputs)
        for tensor in tensors_in(out):
            if host and tensor.device.type == "cpu":
                self._host[tensor] = True
            else:
                self._host.pop(tensor, None)
        return out
