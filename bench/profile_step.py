"""Where the time of one CPU GeSSL step goes: a torch.profiler breakdown, the head, the augmentation.

    PYTHONPATH=. python bench/profile_step.py [--workload convnet-32] [--method fd] [--threads 2] [--quick]
                                              [--default-malloc]

Profiles one default GeSSLStep step and one baseline step (after a warm-up step each) and prints a
markdown table of the profiled wall time split into: convolution kernels (forward and backward),
matmuls, pooling and activations, BatchNorm, other tensor ops (elementwise, reductions, copies, the
SimCLR loss and the head's small ops), autograd-engine bookkeeping (the self time of the engine's
per-node events) and the rest — time outside every profiled op: Python, torch.func's transform
layers, the profiler's own per-op cost — and the step's minor page faults (freed memory faulted in
again, with glibc's default thresholds; see gessl_ext.allocator). Then, measured directly, the head (forward + backward of the
outer KL on the M tasks' embeddings) and the batched SimCLR augmentation of one step's M·N images, as
shares of the step.
"""
from __future__ import annotations

import argparse
import resource
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from gessl_ext import retain_freed_memory
from gessl_ext.head import PairHead, outer_kl
from gessl_ext.train.data import BatchedAugment, TaskSampler

from bench_step import CONVNET_32, CONVNET_128, RESNET18_16
from workloads import HYPERPARAMETERS, build, warm_up

WORKLOADS = {"convnet-32": CONVNET_32, "convnet-128": CONVNET_128, "resnet18-16": RESNET18_16}
CATEGORIES = [  # first match wins; matched against the op name
    ("convolution", ("convolution",)),
    ("matmul", ("::mm", "::addmm", "::bmm", "::matmul")),
    ("pooling + activation", ("pool", "clamp_min", "threshold", "relu")),
    ("batch norm", ("batch_norm",)),
    ("autograd engine bookkeeping", ("autograd::engine",)),
]


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other tensor ops"


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def breakdown(run, views) -> tuple[float, dict[str, float], int]:
    """(wall seconds of one profiled call, self seconds per category incl. 'outside profiled ops', minor page
    faults of the call: pages the allocator handed back to the OS and touched again, counted inside the ops)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        faults = minor_faults()
        start = time.perf_counter()
        run(views)
        wall = time.perf_counter() - start
        faults = minor_faults() - faults
    seconds = defaultdict(float)
    for event in prof.events():
        seconds[category(event.name)] += event.self_cpu_time_total / 1e6
    seconds["outside profiled ops (Python, torch.func, profiler)"] = wall - sum(seconds.values())
    return wall, dict(seconds), faults


def head_seconds(workload, repeats: int = 20) -> float:
    """Forward + backward of the outer KL for the M tasks of one step (embeddings [N, 128])."""
    head = PairHead(HYPERPARAMETERS["head_temperature"])
    z = torch.randn(workload.num_tasks, 2, workload.task_size, 128, requires_grad=True)
    targets = torch.randn(workload.num_tasks, 2, workload.task_size, 128)
    start = time.perf_counter()
    for _ in range(repeats):
        for task in range(workload.num_tasks):
            outer_kl(head, z[task, 0], z[task, 1], targets[task, 0], targets[task, 1]).backward()
    return (time.perf_counter() - start) / repeats


def augmentation_seconds(workload, repeats: int = 5) -> float:
    """SimCLR augmentation of one step's M·N uint8 images into views [M, 2, N, C, S, S] (TaskSampler.views)."""
    channels, side = workload.in_channels, workload.image_size
    augment = BatchedAugment(channels, [0.5] * channels, [0.25] * channels)
    images = torch.randint(0, 256, (workload.num_tasks * workload.task_size, channels, side, side), dtype=torch.uint8)
    sampler = TaskSampler(images, workload.num_tasks, workload.task_size, augment)
    generator = torch.Generator().manual_seed(0)
    groups = next(sampler.epoch(generator))
    start = time.perf_counter()
    for _ in range(repeats):
        sampler.views(groups, generator)
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="CPU profile of one GeSSL step")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="convnet-32")
    parser.add_argument("--method", default="fd")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the workload's small version (a check of the script)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc thresholds (default: gessl_ext.retain_freed_memory())")
    args = parser.parse_args(argv)
    retained = False if args.default_malloc else retain_freed_memory()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload].quick() if args.quick else WORKLOADS[args.workload]
    views = workload.views()
    results = {}
    for implementation in ("gessl", "baseline"):
        warm_up(workload, implementation, args.method)
        _, run = build(workload, implementation, args.method)
        run(views)
        results[implementation] = breakdown(run, views)

    malloc = "freed memory retained" if retained else "glibc defaults"
    print(f"{workload.name}, {args.method}, {args.threads} threads, torch {torch.__version__}, malloc: {malloc}\n")
    print("| part | GeSSLStep s | share | baseline s | share |\n|---|---|---|---|---|")
    labels = [label for label, _ in CATEGORIES[:-1]] + ["other tensor ops", CATEGORIES[-1][0],
                                                        "outside profiled ops (Python, torch.func, profiler)"]
    for label in labels:
        cells = [f"{parts.get(label, 0.0):.2f} | {parts.get(label, 0.0) / wall:.1%}" for wall, parts, _ in results.values()]
        print(f"| {label} | {' | '.join(cells)} |")
    print(f"| **total (profiled wall)** | {results['gessl'][0]:.2f} | | {results['baseline'][0]:.2f} | |")
    print(f"| minor page faults in the step | {results['gessl'][2]} | | {results['baseline'][2]} | |\n")
    step = results["gessl"][0]
    head, augmentation = head_seconds(workload), augmentation_seconds(workload)
    print(f"head, M tasks, forward + backward: {head * 1e3:.1f} ms ({head / step:.2%} of the profiled step)")
    print(f"augmentation of one step's {workload.num_tasks * workload.task_size} images (two views): "
          f"{augmentation * 1e3:.1f} ms ({augmentation / step:.2%} of the profiled step)")


if __name__ == "__main__":
    main()
