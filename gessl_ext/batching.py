"""How a step runs its M tasks (``GeSSLStep(task_batching=...)``), and what ``"auto"`` picks (docs/performance.md).

``"loop"`` runs one task at a time; ``"vmap"`` batches a chunk of tasks into one ``torch.func.vmap`` call, where
per-task weights turn every convolution into a grouped one over the chunk. ``"auto"`` picks by device and by the
size of one task:

* CPU: the loop. vmap is no faster there and holds about 10× the memory (docs/performance.md).
* Any other device: vmap (over all M tasks, or in chunks of ``task_chunk_size`` when it is set) while one task's
  inputs (2N views) hold fewer than :data:`LOOP_FROM_TASK_VALUES` values, the loop from there on. Measured on one
  H200 (2026-11-30, ResNet-18 on 3×32×32 inputs, M = 8, ``fd``, tf32; ../shared/gpu/h200-2026-11-30): vmap took
  392 / 585 ms at N = 16 / 32, our loop 972 / 1160 ms and an independent per-task loop 885 / 1319 ms; at N = 128
  vmap took 1838 ms and the independent loop 1550 ms (ours was not run), one task's batch keeping the device busy by
  itself. Lines through these points cross between N = 96 and 104 (by which loop, and whether times or their ratio
  are interpolated); the threshold sits at N = 96, where the lines put vmap 0–6 % ahead of the loop. Only that
  model and device were measured.
* Out of device memory under vmap (``torch.OutOfMemoryError``): ``"auto"`` halves the tasks per vmap call and runs
  the step again (down to the loop), warns once, and keeps that choice for later steps with views of the same shape.
  The retry starts from fresh running-statistics copies and the same random streams, so a deterministic model gets
  the loop's result to rounding; with random layers (Dropout) the draws depend on the chunking, as they do between
  the loop and vmap. An allocation failure that torch reports as another error (a cuBLAS or cuDNN status) is raised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TASK_BATCHING = ("auto", "vmap", "loop")

LOOP_FROM_TASK_VALUES = 2 * 96 * 3 * 32 * 32
"""Input values of one task (2N views) from which ``"auto"`` runs the loop on an accelerator: N = 96 pairs of
3×32×32 images, at the crossing measured on an H200 (N = 96–104)."""


@dataclass(frozen=True)
class TaskBatching:
    """How a step runs its tasks: ``mode`` "loop" or "vmap"; ``chunk`` tasks per vmap call (None: all M)."""

    mode: str
    chunk: int | None = None

    def halved(self, num_tasks: int) -> "TaskBatching":
        """Half as many tasks per vmap call (rounded up); the loop once that is one task."""
        chunk = -(-min(self.chunk or num_tasks, num_tasks) // 2)
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
