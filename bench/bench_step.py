"""CPU suite of the GeSSL step benchmarks (issue 8): the default GeSSLStep against the per-task loop
baseline and the CPU ideal, all measured in the same run with ``torch.set_num_threads(2)``, fp32.

    PYTHONPATH=. python -m pytest bench/bench_step.py --benchmark-json=cpu.json
    python bench/make_results.py cpu.json --write bench/RESULTS.md

``--quick`` (or BENCH_QUICK=1) shrinks every workload (CI: ``--quick --benchmark-disable``). Each
step benchmark records the median process CPU time next to the wall time (robust to other processes
on the machine) and, when benchmarking is enabled, the peak RSS of one step in a fresh process
(bench/peak_rss.py). Plain-pass benchmarks time one pass over the M tasks (``plain_tasks``) or
one pass on the union batch (``plain_union``); the ideal is ``passes`` of them (bench/workloads.py).
"""
from __future__ import annotations

import statistics
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

GESSL_VARIANTS = {"default": {}, "vmap": {"task_batching": "vmap"},
                  "vmap_chunk2": {"task_batching": "vmap", "task_chunk_size": 2}}
# (workload, hypergradient, timed rounds, GeSSLStep variants besides the baseline)
STEP_CASES = [
    (CONVNET_32, "fd", 5, ("default", "vmap", "vmap_chunk2")),
    (CONVNET_32, "hvp", 3, ("default",)),
    (CONVNET_32, "itd", 3, ("default",)),
    (CONVNET_128, "fd", 3, ("default",)),
    (RESNET18_16, "fd", 1, ("default",)),
]
PLAIN_ROUNDS = {CONVNET_32: 10, CONVNET_128: 5, RESNET18_16: 3}
TARGETS = {(CONVNET_32, "fd"), (CONVNET_128, "fd"), (RESNET18_16, "fd")}


def _params():
    """Per workload: its plain passes first, then its steps, so the ratios compare neighbouring measurements."""
    for workload, plain_rounds in PLAIN_ROUNDS.items():
        for implementation in ("plain_tasks", "plain_union"):
            yield pytest.param(workload, "plain", plain_rounds, implementation, implementation,
                               marks=[pytest.mark.target], id=f"{workload.name}-{implementation}")
        for case_workload, method, rounds, variants in STEP_CASES:
            if case_workload != workload:
                continue
            marks = [pytest.mark.target] if (workload, method) in TARGETS else []
            for variant in (*variants, "baseline"):
                implementation = "baseline" if variant == "baseline" else "gessl"
                variant_rounds = rounds if variant in ("default", "baseline") else 1  # vmap on the CPU: ~20x slower
                yield pytest.param(workload, method, variant_rounds, implementation, variant, marks=marks,
                                   id=f"{workload.name}-{method}-{variant}")


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def retained_memory(request) -> bool:
    """Whether malloc keeps freed memory (``gessl_ext.retain_freed_memory``; process-wide, for every
    implementation alike, and in the peak-RSS subprocesses); ``--default-malloc`` keeps glibc's defaults."""
    return False if request.config.getoption("--default-malloc") else retain_freed_memory()


@pytest.fixture(scope="module")
def quick(request):
    return quick_mode(request.config)


def _measure(benchmark, quick, retained, workload, implementation, method, rounds, variant, **options):
    """Time ``rounds`` units of work (wall and process CPU time); record peak RSS when benchmarking."""
    if quick:
        workload, rounds = workload.quick(), 1
    warm_up(workload, implementation, method, **options)
    model, run = build(workload, implementation, method, **options)
    views = workload.views()
    cpu_times = []

    def timed():
        start = time.process_time()
        run(views)
        cpu_times.append(time.process_time() - start)

    benchmark.group = f"{workload.name} {method}"
    benchmark.pedantic(timed, setup=lambda: model.zero_grad(set_to_none=True), rounds=rounds,
                       warmup_rounds=1 if rounds > 1 else 0)
    benchmark.extra_info.update(
        suite="cpu", workload=workload.name, method=method, implementation=implementation, variant=variant,
        passes=workload.ideal_passes, threads=CPU_THREADS, torch=torch.__version__, quick=quick,
        cpu_time_median=statistics.median(cpu_times[-rounds:]), retained_freed_memory=retained,
    )
    if benchmark.enabled:
        benchmark.extra_info.update(measure_in_subprocess(workload, implementation, method, CPU_THREADS,
                                                          retain_freed_memory=retained, **options))


@pytest.mark.parametrize("workload,method,rounds,implementation,variant", list(_params()))
def test_cpu(benchmark, quick, retained_memory, workload, method, rounds, implementation, variant):
    options = GESSL_VARIANTS.get(variant, {}) if implementation == "gessl" else {}
    _measure(benchmark, quick, retained_memory, workload, implementation, method, rounds, variant, **options)
