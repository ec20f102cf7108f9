"""task_batching: what "auto" picks per device and task size, and its fallback when vmap runs out of memory."""
import copy

import pytest
import torch
from torch import nn

import gessl_ext.step
from gessl_ext import GeSSLStep, losses
from gessl_ext.batching import LOOP_FROM_TASK_VALUES, TaskBatching, auto_batching
from reference import rel

SIMCLR = losses.SimCLR(temperature=0.5)


def bn_convnet():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 6)).double()


@pytest.mark.parametrize("device", ["cuda", "xpu", "mps"], ids=["nvidia", "intel", "apple"])  # no GPU needed
def test_auto_runs_vmap_for_small_tasks_and_the_loop_for_large_ones_on_an_accelerator(device):
    """The H200 crossing (N ≈ 96 pairs of 3×32×32 images) as the boundary; any M; other input shapes by their size."""
    device = torch.device(device)
    assert auto_batching(device, torch.Size([8, 2, 95, 3, 32, 32])) == TaskBatching("vmap")
    assert auto_batching(device, torch.Size([8, 2, 96, 3, 32, 32])) == TaskBatching("loop")
    assert auto_batching(device, torch.Size([64, 2, 128, 3, 32, 32])) == TaskBatching("loop")
    assert auto_batching(device, torch.Size([8, 2, 1, 3, 224, 224])) == TaskBatching("vmap")   # 301,056 values
    assert auto_batching(device, torch.Size([8, 2, 2, 3, 224, 224])) == TaskBatching("loop")   # 602,112 values
    assert LOOP_FROM_TASK_VALUES == 589_824


@pytest.mark.parametrize("shape", [(8, 2, 4, 1, 8, 8), (8, 2, 512, 3, 32, 32)])
def test_auto_runs_the_loop_on_the_cpu_at_every_size(shape):
    assert auto_batching(torch.device("cpu"), torch.Size(shape)) == TaskBatching("loop")
    step = GeSSLStep(bn_convnet(), SIMCLR)
    assert step.task_batching_for(torch.empty(shape, dtype=torch.float64)) == TaskBatching("loop")


def test_explicit_settings_are_kept_whatever_the_size():
    views = torch.empty(8, 2, 512, 3, 32, 32, dtype=torch.float64)
    assert GeSSLStep(bn_convnet(), SIMCLR, task_batching="vmap", task_chunk_size=3).task_batching_for(views) == \
        TaskBatching("vmap", 3)
    assert GeSSLStep(bn_convnet(), SIMCLR, task_batching="loop", task_chunk_size=3).task_batching_for(views) == \
        TaskBatching("loop")


@pytest.mark.parametrize("num_tasks, chunk, halved", [
    (8, None, TaskBatching("vmap", 4)), (8, 4, TaskBatching("vmap", 2)), (5, None, TaskBatching("vmap", 3)),
    (8, 2, TaskBatching("loop")), (3, 3, TaskBatching("vmap", 2)), (5, 64, TaskBatching("vmap", 3))])
def test_halving_the_chunk_ends_in_the_loop(num_tasks, chunk, halved):
    assert TaskBatching("vmap", chunk).halved(num_tasks) == halved


class _OutOfMemoryAbove:
    """A model's forward that runs out of memory (as the CUDA allocator reports it) in the middle of a vmapped attempt
    over more than ``limit`` tasks: at its 6th call, after the tasks' first pass has updated their running-statistics
    copies. ``attempts`` lists what each ``run_tasks`` call ran."""

    def __init__(self, monkeypatch, limit):
        self.limit, self.attempts, self.calls = limit, [], 0
        run_tasks = gessl_ext.step.run_tasks

        def run(task_fn, theta, views, stats, batching, chunk, *args):
            self.attempts.append((batching, chunk))
            self.calls = 0
            return run_tasks(task_fn, theta, views, stats, batching, chunk, *args)

        monkeypatch.setattr(gessl_ext.step, "run_tasks", run)

    def wrap(self, model):
        forward = model.forward

        def failing(x):
            self.calls += 1
            batching, chunk = self.attempts[-1] if self.attempts else ("loop", None)
            if batching == "vmap" and (chunk or 5) > self.limit and self.calls == 6:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(x)

        model.forward = failing
        return model


@pytest.mark.parametrize("limit, fallback", [(2, TaskBatching("vmap", 2)), (1, TaskBatching("loop"))])
@pytest.mark.parametrize("call", ["step", "surrogate"])
def test_auto_out_of_memory_falls_back_to_smaller_chunks_with_the_same_result(monkeypatch, limit, fallback, call):
    """vmap over all 5 tasks runs out of memory mid-pass: "auto" halves the chunk until it fits (3, then 2; or the
    loop) and leaves the loop's .grad (added once to what was there) and running statistics (float64, < 1e-12), warns
    once at the caller's line, and starts from the smaller chunk at the next step of that shape; an explicit "vmap"
    raises the error instead."""
    monkeypatch.setattr(gessl_ext.step, "auto_batching", lambda device, shape: TaskBatching("vmap"))
    oom = _OutOfMemoryAbove(monkeypatch, limit)
    base, views = bn_convnet(), torch.randn(5, 2, 4, 1, 6, 6, dtype=torch.float64)

    def run(step):
        for p in step.parameters():
            p.grad = torch.ones_like(p)
        (step.surrogate(views).backward() if call == "surrogate" else step(views))

    looped = copy.deepcopy(base)
    run(GeSSLStep(looped, SIMCLR, hypergrad="hvp", target_steps=2, task_batching="loop"))
    oom.attempts.clear()
    model = copy.deepcopy(base)
    step = GeSSLStep(oom.wrap(model), SIMCLR, hypergrad="hvp", target_steps=2)
    with pytest.warns(UserWarning, match=r"out of device memory.*\(vmap over all tasks\)") as warned:
        run(step)
    ours = [w for w in warned if "GeSSLStep" in str(w.message)]
    assert len(ours) == 1 and f"run as {fallback}." in str(ours[0].message), [str(w.message) for w in ours]
    assert ours[0].filename == __file__
    assert oom.attempts == [("vmap", None), ("vmap", 3)] + ([("vmap", 2)] if limit == 2 else [("vmap", 2), ("loop", None)])
    assert step.task_batching_for(views) == fallback
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    want = torch.cat([p.grad.flatten() for p in looped.parameters()])
    assert rel(got, want) < 1e-12
    for (name, b), want_b in zip(model.named_buffers(), looped.buffers()):
        assert torch.allclose(b, want_b, rtol=1e-12, atol=1e-14), name

    oom.attempts.clear()
    run(step)
    assert oom.attempts == [(fallback.mode, fallback.chunk)]

    explicit = GeSSLStep(oom.wrap(copy.deepcopy(base)), SIMCLR, hypergrad="hvp", task_batching="vmap")
    with pytest.raises(torch.OutOfMemoryError):
        explicit(views)


def test_task_batching_used_is_deprecated():
    with pytest.warns(FutureWarning, match="task_batching_for"):
        assert GeSSLStep(bn_convnet(), SIMCLR).task_batching_used == "loop"
