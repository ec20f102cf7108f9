"""GPU suite of the GeSSL step benchmarks (issue 5); skipped without CUDA.

ResNet-18 (32×32) and ResNet-50 (64×64), SimCLR, M = 8, N ∈ {16, 32, 128}, K = 1, λ = 10, hypergradients
fd / itd / hvp, in fp32 with TF32 allowed ("tf32") and under bf16 autocast ("bf16"). Compared in one run:
the default GeSSLStep (task_batching="auto", by task size: vmap for ResNet-18 at N = 16, 32 and ResNet-50 at N = 16,
the loop for the others; gessl_ext/batching.py), the per-task loop baseline in the same precision, and the ideal: ``passes`` plain SimCLR training passes on the union batch of
M·N pairs, channels-last, cudnn.benchmark, same precision. Per benchmark: median wall time (synchronised), the
peak GPU memory of one step above what was allocated before it (torch.cuda.max_memory_allocated), and
for bf16 the relative difference of the hypergradient from a strict-fp32 step.

    PYTHONPATH=. python -m pytest bench/bench_step_gpu.py -m target --benchmark-json=gpu.json   # issue 5's targets
    PYTHONPATH=. python -m pytest bench/bench_step_gpu.py --benchmark-json=gpu_all.json        # the full sweep
    PYTHONPATH=. python -m pytest bench/bench_step_gpu.py -m compile                           # torch.compile variant

BENCH_GPU_ON_CPU=1 with --quick runs the same code on the CPU (a check of the suite itself, not a measurement).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import time

import pytest
import torch

from gessl_ext.batching import TaskBatching, auto_batching
from workloads import Workload, build, quick_mode

ON_CPU = os.environ.get("BENCH_GPU_ON_CPU", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE != "cuda" and not ON_CPU, reason="GPU suite: needs a CUDA device")

PRECISIONS = {"tf32": None, "bf16": torch.bfloat16}
SIZES = (16, 32, 128)
METHODS = ("fd", "itd", "hvp")
TIME_PER_BENCHMARK_S = 2.0  # rounds = clamp(this / one step, 3, 30)


def resnet18(task_size):
    return Workload("resnet18", 3, 32, num_tasks=8, task_size=task_size)


def resnet50(task_size):
    return Workload("resnet50", 3, 64, num_tasks=8, task_size=task_size)


def _is_target(workload, method, implementation, precision="tf32"):
    """Issue 5's targets: ResNet-18, N = 32, fd (speed, memory, bf16), with itd's memory for contrast; and the
    default step at N = 128 in tf32 (where vmap lost to a per-task loop; see test_step_batching)."""
    if workload == resnet18(128):
        return method == "fd" and precision == "tf32" and implementation == "gessl"
    return workload == resnet18(32) and (method == "fd" or (method == "itd" and implementation == "gessl"))


def _step_params():
    for make in (resnet18, resnet50):
        for task_size in SIZES:
            workload = make(task_size)
            for method in METHODS:
                for precision in PRECISIONS:
                    for implementation in ("gessl", "baseline"):
                        marks = [pytest.mark.target] if _is_target(workload, method, implementation, precision) else []
                        yield pytest.param(workload, method, precision, implementation, marks=marks,
                                           id=f"{workload.name}-{method}-{precision}-{implementation}")


def _plain_params():
    for make in (resnet18, resnet50):
        for task_size in SIZES:
            workload = make(task_size)
            for precision in PRECISIONS:
                marks = [pytest.mark.target] if workload == resnet18(32) else []
                yield pytest.param(workload, precision, marks=marks, id=f"{workload.name}-{precision}-plain_union")


@contextlib.contextmanager
def precision_settings(precision: str):
    """cudnn.benchmark on; TF32 matmuls/convolutions allowed unless precision == "fp32" (strict)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def step_peak_memory_mib(model, run, views):
    """Peak GPU memory of one unit of work above the memory allocated before it (MiB); None on the CPU."""
    if DEVICE != "cuda":
        return None
    model.zero_grad(set_to_none=True)
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run(views)
    synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def flat_hypergradient(workload, method, precision):
    """dL/dθ [P] of one default step from the workload's seeded weights, in the given precision."""
    model, run = build(workload, "gessl", method, DEVICE, autocast_dtype=PRECISIONS.get(precision))
    with precision_settings(precision):
        run(workload.views(DEVICE))
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def quick(request):
    return quick_mode(request.config)


def _measure(benchmark, workload, make, *, implementation, method, precision, variant):
    """Time ``run(views)`` for ``(model, run) = make()`` (synchronised; rounds sized to ~TIME_PER_BENCHMARK_S)
    and record the peak memory of one more call. Out of GPU memory → skipped with the message (a result too)."""
    try:
        with precision_settings(precision):
            _time_and_peak(benchmark, f"{workload.name} {method} {precision}", workload, *make())
    except torch.cuda.OutOfMemoryError as error:
        message = str(error).splitlines()[0]
    else:
        benchmark.extra_info.update(
            suite="gpu", workload=workload.name, method=method, precision=precision, implementation=implementation,
            variant=variant, passes=workload.ideal_passes, torch=torch.__version__,
            device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (suite check)",
        )
        return
    gc.collect()  # the failed call's tensors are unreachable once the except block has ended
    torch.cuda.empty_cache()
    pytest.skip(f"out of GPU memory: {message}")


def _time_and_peak(benchmark, group, workload, model, run):
    views = workload.views(DEVICE)

    def timed():
        run(views)
        synchronize()

    def clear_grads():
        model.zero_grad(set_to_none=True)

    for _ in range(2):  # cudnn autotuning, compilation, allocator warm-up
        clear_grads()
        timed()
    clear_grads()
    start = time.perf_counter()
    timed()
    rounds = min(30, max(3, math.ceil(TIME_PER_BENCHMARK_S / (time.perf_counter() - start))))
    benchmark.group = group
    benchmark.pedantic(timed, setup=clear_grads, rounds=rounds)
    benchmark.extra_info["peak_gpu_mib"] = step_peak_memory_mib(model, run, views)


@pytest.mark.parametrize("workload,method,precision,implementation", list(_step_params()))
def test_step(benchmark, quick, workload, method, precision, implementation):
    target = _is_target(workload, method, implementation, precision)
    workload = workload.quick() if quick else workload
    _measure(benchmark, workload,
             lambda: build(workload, implementation, method, DEVICE, autocast_dtype=PRECISIONS[precision]),
             implementation=implementation, method=method, precision=precision,
             variant="default" if implementation == "gessl" else implementation)
    if implementation == "gessl" and precision == "bf16" and (target or quick):
        reference = flat_hypergradient(workload, method, "fp32")
        difference = flat_hypergradient(workload, method, "bf16") - reference
        benchmark.extra_info["hypergrad_rel_diff_vs_fp32"] = float(difference.norm() / reference.norm())


@pytest.mark.parametrize("workload,precision", list(_plain_params()))
def test_plain_union(benchmark, quick, workload, precision):
    workload = workload.quick() if quick else workload
    _measure(benchmark, workload,
             lambda: build(workload, "plain_union", "fd", DEVICE, autocast_dtype=PRECISIONS[precision],
                           channels_last=True),
             implementation="plain_union", method="plain", precision=precision, variant="plain_union")


BATCHINGS = {"loop": dict(task_batching="loop"), "vmap": dict(task_batching="vmap"),
             "vmap-chunk4": dict(task_batching="vmap", task_chunk_size=4)}


def _batching_params():
    for task_size in SIZES:
        workload = resnet18(task_size)
        shape = (workload.num_tasks, 2, task_size, workload.in_channels, workload.image_size, workload.image_size)
        auto = auto_batching(torch.device("cuda"), torch.Size(shape))
        for batching, settings in BATCHINGS.items():
            if TaskBatching(settings["task_batching"], settings.get("task_chunk_size")) == auto:
                continue   # test_step's default step runs it
            marks = [pytest.mark.target] if task_size in (32, 128) else []
            yield pytest.param(workload, batching, marks=marks, id=f"{workload.name}-{batching}")


@pytest.mark.parametrize("workload,batching", list(_batching_params()))
def test_step_batching(benchmark, quick, workload, batching):
    """The default step (fd, tf32) with the task batchings ``task_batching="auto"`` did not pick, against test_step's
    default: the measurements that refit auto's size threshold (issue 16; gessl_ext/batching.py)."""
    workload = workload.quick() if quick else workload
    _measure(benchmark, workload, lambda: build(workload, "gessl", "fd", DEVICE, **BATCHINGS[batching]),
             implementation="gessl", method="fd", precision="tf32", variant=batching)


@pytest.mark.compile
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_step_compiled(benchmark, quick, precision):
    """torch.compile of the whole default step (ResNet-18, N = 32, fd); skipped, with the reason, if it fails."""
    workload = resnet18(32).quick() if quick else resnet18(32)

    def make():
        model, step = build(workload, "gessl", "fd", DEVICE, autocast_dtype=PRECISIONS[precision])
        return model, torch.compile(step)

    try:
        with precision_settings(precision):
            model, compiled = make()
            compiled(workload.views(DEVICE))
    except Exception as error:  # the reason is reported in the skip message
        pytest.skip(f"torch.compile of GeSSLStep failed: {type(error).__name__}: {str(error)[:300]}")
    _measure(benchmark, workload, lambda: (model, compiled), implementation="gessl", method="fd",
             precision=precision, variant="compiled")
