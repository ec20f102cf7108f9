"""The workloads of the step benchmarks and the implementations they compare.

A :class:`Workload` fixes the model, the input size and the task shape (M tasks of N pairs, K inner
steps, λ target steps). :func:`build` turns (workload, implementation, hypergradient) into a callable
``run(views)`` doing one unit of work:

* ``gessl``       one :class:`gessl_ext.GeSSLStep` step (options such as ``task_batching`` pass through);
* ``baseline``    one step of the per-task loop in ``baseline_loop.py``;
* ``plain_tasks`` one plain SimCLR forward+backward per task, tasks one at a time (M passes);
* ``plain_union`` one plain SimCLR forward+backward on the union batch of the M·N pairs.

The ideal step is ``Workload.ideal_passes`` plain passes: K inner gradients, λ target gradients, the
outer forward+backward and the 2K gradients of the finite-difference products — the model
evaluations no implementation of the ``fd`` step can avoid (the target's forward-only pass is not
counted). ``itd`` and ``hvp`` need double backward on top, so their ideal ratio is > 1 by design.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from gessl_ext import GeSSLStep, losses
from gessl_ext.train.models import build_model

from baseline_loop import BaselineLoopStep

IMPLEMENTATIONS = ("gessl", "baseline", "plain_tasks", "plain_union")
HYPERPARAMETERS = dict(inner_lr=0.05, head_temperature=0.1)  # fd: its default radius 0.01 in both implementations
SIMCLR_TEMPERATURE = 0.5


def quick_mode(config=None) -> bool:
    """True under ``--quick`` or BENCH_QUICK=1 (small shapes that exercise every code path)."""
    if os.environ.get("BENCH_QUICK", "0") not in ("", "0"):
        return True
    return bool(config is not None and config.getoption("--quick", default=False))


@dataclass(frozen=True)
class Workload:
    backbone: str
    in_channels: int
    image_size: int
    num_tasks: int
    task_size: int
    inner_steps: int = 1
    target_steps: int = 10

    @property
    def name(self) -> str:
        return f"{self.backbone}-{self.image_size}px-M{self.num_tasks}-N{self.task_size}"

    @property
    def ideal_passes(self) -> int:
        """K + λ + 1 + 2K plain forward+backward passes."""
        return 3 * self.inner_steps + self.target_steps + 1

    def quick(self) -> "Workload":
        """The same code paths at a size that runs in seconds on a CPU."""
        small_image = self.image_size if self.backbone.startswith("convnet") else 16
        return replace(self, image_size=small_image, num_tasks=2, task_size=min(self.task_size, 4), target_steps=2)

    def model(self, device="cpu", seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(self.backbone, self.in_channels, self.image_size).to(device).train()

    def views(self, device="cpu", seed: int = 1) -> torch.Tensor:
        """[M, 2, N, C, S, S] standard-normal images."""
        generator = torch.Generator().manual_seed(seed)
        shape = (self.num_tasks, 2, self.task_size, self.in_channels, self.image_size, self.image_size)
        return torch.randn(shape, generator=generator).to(device)


def plain_pass(model, objective, x1, x2, autocast_dtype=None):
    """One plain SSL training pass: forward of cat(x1, x2), the loss, backward into ``.grad``."""
    with torch.autocast(x1.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = objective(model, x1, x2)
    loss.backward()


def build(workload: Workload, implementation: str, method: str = "fd", device="cpu",
          autocast_dtype=None, channels_last: bool = False, **gessl_options):
    """(model, run(views)) for one implementation; ``run`` does one unit of work (see module doc)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    model = workload.model(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = losses.SimCLR(temperature=SIMCLR_TEMPERATURE)
    settings = dict(inner_lr=HYPERPARAMETERS["inner_lr"], inner_steps=workload.inner_steps,
                    target_steps=workload.target_steps, hypergrad=method,
                    head_temperature=HYPERPARAMETERS["head_temperature"],
                    autocast_dtype=autocast_dtype)
    if implementation == "gessl":
        run = GeSSLStep(model, objective, warn_nonsmooth=False, **settings, **gessl_options)
    elif implementation == "baseline":
        run = BaselineLoopStep(model, objective, **settings)
    elif implementation == "plain_tasks":
        def run(views):
            for task in views:
                plain_pass(model, objective, task[0], task[1], autocast_dtype)
    else:
        def run(views):
            x1, x2 = views.transpose(0, 1).flatten(1, 2)  # each [M*N, C, S, S]
            if channels_last:
                x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
            plain_pass(model, objective, x1, x2, autocast_dtype)
    return model, run


def warm_up(workload: Workload, implementation: str, method: str = "fd", device="cpu", **options) -> None:
    """One unit of work on ``workload.quick()``: the lazy imports and one-time set-up of an implementation
    (torch.func's first call imports torch._dynamo) stay out of the measured calls."""
    small = workload.quick()
    _, run = build(small, implementation, method, device, **options)
    run(small.views(device))
