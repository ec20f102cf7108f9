"""CPU suite of the GeSSL step benchmarks (issue 8): the default GeSSLStep against the per-task loop
baseline and the CPU ideal, all measured in the same run with ``torch.set_num_threads(2)``, fp32.

    PYTHONPATH=. python -m pytest bench/bench_step.py --benchmark-json=cpu.json
    python bench/make_results.py cpu.json --write bench/RESULTS.md

One benchmark per (workload, hypergradient). Each of its rounds runs every compared implementation
once (bench/workloads.py: the GeSSLStep variants, the baseline, one plain pass per task and one on the
union batch), in an order that rotates from round to round. On a shared 2-core VM the speed of the
machine, and of a freshly built process state, drifts by 5–15 % between measurements minutes apart;
interleaving puts every ratio's two sides into the same minute. Per-implementation wall times go to
``extra_info["seconds"]``, and make_results.py takes ratios as medians of per-round ratios.

Before the first round the suite calls ``gessl_ext.retain_freed_memory()`` (process-wide, for every
implementation alike; ``--default-malloc`` keeps glibc's defaults). When benchmarking is enabled, each
implementation's peak RSS of one unit of work is measured in a fresh process (bench/peak_rss.py).
``--quick`` (or BENCH_QUICK=1) shrinks every workload (CI: ``--quick --benchmark-disable``).
"""
from __future__ import annotations

import time

import pytest
import torch

from gessl_ext import retain_freed_memory

from peak_rss import measure_in_subprocess
from workloads import Workload, build, quick_mode, warm_up

CPU_THREADS = 2
CONVNET_32 = Workload("convnet", 1, 28, num_tasks=8, task_size=32)
CONVNET_128 = Workload("convnet", 1, 28, num_tasks=8, task_size=128)
RESNET18_16 = Workload("resnet18", 3, 32, num_tasks=8, task_size=16)

# name -> (implementation of bench/workloads.py, GeSSLStep options)
VARIANTS = {
    "default": ("gessl", {}),
    "vmap": ("gessl", {"task_batching": "vmap"}),
    "vmap_chunk2": ("gessl", {"task_batching": "vmap", "task_chunk_size": 2}),
    "baseline": ("baseline", {}),
    "plain_tasks": ("plain_tasks", {}),
    "plain_union": ("plain_union", {}),
}
COMPARED = ("default", "baseline", "plain_tasks", "plain_union")
# (workload, hypergradient, timed rounds, variants); the issue-8 targets are stated for the fd rows
CASES = [
    (CONVNET_32, "fd", 5, ("vmap", "vmap_chunk2", *COMPARED)),
    (CONVNET_32, "hvp", 3, COMPARED),
    (CONVNET_32, "itd", 3, COMPARED),
    (CONVNET_128, "fd", 3, COMPARED),
    (RESNET18_16, "fd", 2, COMPARED),
]


@pytest.fixture(scope="module")
def quick(request) -> bool:
    return quick_mode(request.config)


@pytest.fixture(scope="module", autouse=True)
def cpu_threads(quick):
    """CPU_THREADS intra-op threads while measuring. ``--quick`` measures nothing and keeps the caller's
    setting (CI runs it with OMP_NUM_THREADS=1): two spinning threads on a 2-core machine shared with other
    work made the quick run 10-20x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(saved if quick else CPU_THREADS)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def retained_memory(request) -> bool:
    """Whether malloc keeps freed memory (see the module docstring)."""
    return False if request.config.getoption("--default-malloc") else retain_freed_memory()


def interleaved_round(runs: dict, views, seconds: dict, counter: list) -> None:
    """Run every implementation once, starting at a rotating position; append each one's wall seconds."""
    names = list(runs)
    shift = counter[0] % len(names)
    counter[0] += 1
    for name in names[shift:] + names[:shift]:
        model, run = runs[name]
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        run(views)
        seconds[name].append(time.perf_counter() - start)


@pytest.mark.parametrize("workload,method,rounds,variants",
                         [pytest.param(*case, id=f"{case[0].name}-{case[1]}") for case in CASES])
def test_cpu(benchmark, quick, retained_memory, workload, method, rounds, variants):
    if quick:
        workload, rounds = workload.quick(), 1
    runs = {}
    for variant in variants:
        implementation, options = VARIANTS[variant]
        if benchmark.enabled:  # keeps one-time set-up out of the timings; nothing is timed when disabled
            warm_up(workload, implementation, method, **options)
        runs[variant] = build(workload, implementation, method, **options)
    views = workload.views()
    seconds = {variant: [] for variant in variants}
    counter = [0]
    benchmark.group = "cpu"
    warmup_rounds = 1 if rounds > 1 else 0
    benchmark.pedantic(interleaved_round, args=(runs, views, seconds, counter), rounds=rounds,
                       warmup_rounds=warmup_rounds)
    benchmark.extra_info.update(
        suite="cpu", workload=workload.name, method=method, passes=workload.ideal_passes,
        threads=torch.get_num_threads(), torch=torch.__version__, retained_freed_memory=retained_memory, quick=quick,
        seconds={variant: times[-rounds:] for variant, times in seconds.items()},
    )
    if benchmark.enabled:
        benchmark.extra_info["step_peak_mib"] = {
            variant: measure_in_subprocess(workload, VARIANTS[variant][0], method, CPU_THREADS,
                                           retain_freed_memory=retained_memory, **VARIANTS[variant][1])["step_peak_mib"]
            for variant in variants}
