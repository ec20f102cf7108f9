"""Which kernels one default GeSSL step runs on the GPU: a torch.profiler table of the top kernels.

    PYTHONPATH=. python bench/profile_step_gpu.py [--precision bf16 tf32] [--top 25] [--quick]

Workload: ResNet-18 CIFAR-style (32×32), SimCLR, M = 8 tasks, N = 32 pairs, K = 1, λ = 10, ``fd``, the
default ``GeSSLStep`` (``task_batching="auto"``: vmap on CUDA at this size), under bf16 autocast ("bf16") or fp32
with TF32 allowed ("tf32"); cudnn.benchmark on. After two warm-up steps, one step is profiled (CPU + CUDA
activity) and the CUDA kernels are ranked by their total device time: calls, total ms, share of all
kernel time, plus the step's wall time and its kernel-launch count (launch-bound steps show many short
kernels). A precision that fails is reported with its error and the next one still runs; the exit
status is 1 if any failed.

Without CUDA (``--quick``, a check of the script itself) the same code runs on the CPU at the workload's
quick size and ranks CPU ops by self time instead.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_step_gpu import precision_settings
from workloads import Workload, build

PRECISIONS = {"bf16": torch.bfloat16, "tf32": None}
WORKLOAD = Workload("resnet18", 3, 32, num_tasks=8, task_size=32)


def _device_time_us(event, self_time):
    """Device (CUDA) time of a profiler event in µs, under the attribute names of older and newer torch."""
    names = ("self_device_time_total", "self_cuda_time_total") if self_time else ("device_time_total",
                                                                                  "cuda_time_total")
    for name in names:
        if hasattr(event, name):
            return getattr(event, name)
    raise AttributeError(f"profiler event has none of {names}")


def profile_step(workload, precision, device, top):
    """Markdown lines: the step's wall time and the top ``top`` kernels (CUDA) or ops (CPU) of one step."""
    model, run = build(workload, "gessl", "fd", device, autocast_dtype=PRECISIONS[precision])
    views = workload.views(device)

    def step():
        model.zero_grad(set_to_none=True)
        run(views)
        if device == "cuda":
            torch.cuda.synchronize()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with precision_settings(precision):
        for _ in range(2):  # cudnn autotuning, lazy imports, allocator warm-up
            step()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            step()
            wall = time.perf_counter() - start
    events = prof.key_averages()
    if device == "cuda":
        rows = [(e.key, e.count, _device_time_us(e, self_time=True)) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA]
        unit = "kernel"
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total) for e in events]
        unit = "op (CPU self time)"
    rows.sort(key=lambda row: -row[2])
    total_us = sum(row[2] for row in rows) or 1.0
    lines = [f"### {workload.name}, fd, {precision}, {device}",
             "",
             f"step wall time {wall * 1e3:.1f} ms (profiled); {sum(r[1] for r in rows)} {unit} calls, "
             f"{total_us / 1e3:.1f} ms in all",
             "",
             f"| # | {unit} | calls | total ms | share |",
             "|---|---|---|---|---|"]
    for rank, (name, calls, time_us) in enumerate(rows[:top], 1):
        short = name if len(name) <= 100 else name[:97] + "..."
        lines.append(f"| {rank} | `{short.replace('|', '/')}` | {calls} | {time_us / 1e3:.3f} | "
                     f"{time_us / total_us:.1%} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS), default=["bf16", "tf32"])
    parser.add_argument("--top", type=int, default=25, help="rows of the table")
    parser.add_argument("--quick", action="store_true", help="the workload's quick size (a check of the script)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        parser.error("no CUDA device: this profiles the GPU step (use --quick to check the script on the CPU)")
    workload = WORKLOAD.quick() if args.quick else WORKLOAD
    failed = False
    for precision in args.precision:
        try:
            print("\n".join(profile_step(workload, precision, device, args.top)) + "\n", flush=True)
        except Exception as error:  # reported; the next precision still runs
            failed = True
            print(f"### {workload.name}, fd, {precision}, {device}: FAILED\n\n{type(error).__name__}: {error}\n",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
