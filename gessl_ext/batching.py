"""How a step runs its M tasks (``GeSSLStep(task_batching=...)``), and what ``"auto"`` picks (docs/performance.md).

``"loop"`` runs one task at a time; ``"vmap"`` batches a chunk of tasks into one ``torch.func.vmap`` call, where
per-task weights turn every convolution into a grouped one over the chunk. ``"auto"`` picks by device and by the
size of one task:

* CPU: the loop. vmap is no faster there and holds about 10× the memory (docs/performance.md).
* Any other device: vmap over all M tasks while one task's inputs (2N views) hold fewer than
  :data:`LOOP_FROM_TASK_VALUES` values, the loop from there on. Measured on one H200 (2026-11-30, ResNet-18 on
  3×32×32 inputs, M = 8, ``fd``, tf32; ../shared/gpu/h200-2026-11-30): vmap took 0.40–0.50× the time of a
  per-task loop at N = 16 and 32 but 1.19× at N = 128, where one task's batch keeps the device busy by itself;
  interpolated linearly in N, the two cross between N = 96 and 100. Only that model and device were measured; the
  GPU check (bench/gpu_check.sh) times the loop, chunks and all-M vmap at N = 16, 32 and 128.
* Out of device memory under vmap: ``"auto"`` halves the tasks per vmap call and runs the step again (down to
  the loop), warns once, and keeps that choice for later steps with views of the same shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TASK_BATCHING = ("auto", "vmap", "loop")

LOOP_FROM_TASK_VALUES = 2 * 96 * 3 * 32 * 32
"""Input values of one task (2N views) from which ``"auto"`` runs the loop on an accelerator: N = 96 pairs of
3×32×32 images, the crossing measured on an H200 (N = 96–100)."""


@dataclass(frozen=True)
class TaskBatching:
    """How a step runs its tasks: ``mode`` "loop" or "vmap"; ``chunk`` tasks per vmap call (None: all M)."""

    mode: str
    chunk: int | None = None

    def halved(self, num_tasks: int) -> "TaskBatching":
        """Half as many tasks per vmap call (rounded up); the loop once that is one task."""
        chunk = -(-(self.chunk or num_tasks) // 2)
        return TaskBatching("loop") if chunk <= 1 else TaskBatching("vmap", chunk)

    def __str__(self) -> str:
        if self.mode == "loop":
            return "the per-task loop"
        return "vmap over all tasks" if self.chunk is None else f"vmap in chunks of {self.chunk} tasks"


def auto_batching(device: torch.device, views_shape: torch.Size) -> TaskBatching:
    """What ``task_batching="auto"`` runs for views [M, 2, N, *input_shape] on ``device`` (see the module docstring)."""
    if device.type == "cpu" or math.prod(views_shape[1:]) >= LOOP_FROM_TASK_VALUES:
        return TaskBatching("loop")
    return TaskBatching("vmap")
