"""Step-time ratios that survive a drifting machine: implementations alternate round by round.

pytest-benchmark times one benchmark after another; on a shared 2-core VM the speed of the machine
drifts by 10–30 % over minutes, which goes straight into ratios of benchmarks run minutes apart.
Here every round runs each implementation once (default GeSSLStep, the baseline, one plain pass per
task, one plain pass on the union batch), and the ratios are medians of per-round ratios.

    PYTHONPATH=. python bench/compare_interleaved.py --workload convnet-32 --method fd --rounds 5

Like the suite, it calls ``gessl_ext.retain_freed_memory()`` first (``--default-malloc`` does not).

Prints one markdown row per workload (see ``HEADER``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gessl_ext import retain_freed_memory

from bench_step import CONVNET_32, CONVNET_128, RESNET18_16
from workloads import build, warm_up

WORKLOADS = {"convnet-32": CONVNET_32, "convnet-128": CONVNET_128, "resnet18-16": RESNET18_16}
IMPLEMENTATIONS = ("gessl", "baseline", "plain_tasks", "plain_union")
HEADER = ("| workload | hypergrad | rounds | GeSSLStep s | baseline s | ideal s (tasks one at a time) "
          "| ideal s (union) | GeSSLStep / baseline | GeSSLStep / ideal | baseline / ideal | GeSSLStep / union ideal |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def interleaved_times(workload, method: str, rounds: int) -> dict[str, list[float]]:
    """Wall seconds per round for each implementation; the order rotates every round."""
    runs = {}
    for implementation in IMPLEMENTATIONS:
        warm_up(workload, implementation, method)
        model, run = build(workload, implementation, method)
        runs[implementation] = (model, run)
    views = workload.views()
    times = {name: [] for name in IMPLEMENTATIONS}
    for r in range(rounds):
        order = IMPLEMENTATIONS[r % len(IMPLEMENTATIONS):] + IMPLEMENTATIONS[:r % len(IMPLEMENTATIONS)]
        for name in order:
            model, run = runs[name]
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            run(views)
            times[name].append(time.perf_counter() - start)
    return times


def row(workload, method: str, times: dict[str, list[float]]) -> str:
    passes = workload.ideal_passes
    ideal = [passes * t for t in times["plain_tasks"]]
    union = [passes * t for t in times["plain_union"]]

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(a, b))

    medians = [statistics.median(v) for v in (times["gessl"], times["baseline"], ideal, union)]
    ratios = [ratio(times["gessl"], times["baseline"]), ratio(times["gessl"], ideal),
              ratio(times["baseline"], ideal), ratio(times["gessl"], union)]
    return (f"| {workload.name} | {method} | {len(ideal)} | " + " | ".join(f"{m:.2f}" for m in medians) + " | "
            + " | ".join(f"{r:.3f}" for r in ratios) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="interleaved step-time ratios (CPU)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="convnet-32")
    parser.add_argument("--method", default="fd")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the workload's small version (a check of the script)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc thresholds (default: gessl_ext.retain_freed_memory())")
    args = parser.parse_args(argv)
    if not args.default_malloc:
        retain_freed_memory()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload].quick() if args.quick else WORKLOADS[args.workload]
    print(HEADER)
    print(row(workload, args.method, interleaved_times(workload, args.method, args.rounds)))


if __name__ == "__main__":
    main()
