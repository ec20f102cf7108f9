"""Peak tensor memory, aten ops and host syncs of one vmap GeSSL step against one plain union-batch
training step (issue 16), measured on the CPU with the device-independent meters of bench/.

    PYTHONPATH=. python bench/bench_memory.py [--quick] [--workload NAME ...] [--method NAME ...]
                                              [--batching vmap] [--breakdown ROWS] [--channels-last] [--explain]

For each workload (bench/workloads.py: model, M tasks of N pairs, K = 1, λ = 10) it runs one plain
union step (SimCLR forward + backward on all 2·M·N images, ``.grad`` written) and one GeSSLStep per
hypergradient method (``task_batching="vmap"`` by default, the GPU path), each from ``.grad = None`` and
after a warm-up call on one task (:func:`warm_up`), inside a :class:`memory_meter.MemoryMeter`, a
:class:`dispatch_counters.OpCounter` and a :class:`dispatch_counters.SyncCounter`, and prints markdown tables:

* memory: peak live tensor bytes of the step above its entry, against the plain union step's, and
  issue 16's targets (fd ≤ 1.5×, hvp ≤ 2×, itd ≤ 2.5×); what is live at the step's peak, split into
  flat per-task parameter vectors ([.., P]: θᴷ, the target, u, θ ± εu, gradients; counted in units of
  M·P values), per-layer parameter-sized tensors (one layer's weights or gradients for M tasks or one)
  and the rest (activations, saved tensors, workspaces of the ops);
* ops: aten ops that write memory (the device-independent count of kernel launches) against
  ``passes`` × those of the plain step (``passes`` = K + λ + 1 + 2K = 14, the ideal);
* syncs: host-device synchronisations per step, each with its gessl_ext call site, and apart from them
  the reads of tensors that would stay on the host in a GPU run (dispatch_counters.SyncCounter);
* with ``--breakdown ROWS``: the largest groups of storages live at each step's peak (op, call site, shape);
* with ``--channels-last``: the memory format of every convolution's input when the model and the
  views are channels-last (the plain step for contrast);
* with ``--explain``: graph breaks of ``torch._dynamo.explain`` on the step of the smallest workload.

The counts do not depend on the device (see memory_meter.py for what the meter leaves out: kernel
scratch, allocator rounding); on ResNet-18 32px, M = 8, N = 16/32 the meter's fd and hvp peaks are within
1-4 % of torch.cuda.max_memory_allocated on an H200 (../shared/gpu/h200-2026-11-30). One step per
measurement; meters are deterministic, so no repetition. Runtime with one thread on the project's 2-core
VM: the default set ~10 min; resnet18-32px-M8-N16 ~25 min and ~9 GiB of RAM. ``--quick`` runs every part
on a tiny workload in seconds (tests/bench/test_meters.py runs it).
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, replace

import torch

from dispatch_counters import OpCounter, SyncCounter
from memory_meter import MemoryMeter
from workloads import Workload, build

MIB = 2.0 ** 20
WORKLOADS = {
    "convnet-M4-N8": Workload("convnet", 1, 28, num_tasks=4, task_size=8),
    "convnet-M8-N16": Workload("convnet", 1, 28, num_tasks=8, task_size=16),
    "resnet18-16px-M4-N8": Workload("resnet18", 3, 16, num_tasks=4, task_size=8),
    "resnet18-16px-M8-N16": Workload("resnet18", 3, 16, num_tasks=8, task_size=16),
    # the GPU measurement's configuration (../shared/gpu/h200-2026-11-30: fd peak 4.1x, M = 8, N = 16)
    "resnet18-32px-M8-N16": Workload("resnet18", 3, 32, num_tasks=8, task_size=16),
    "resnet18-32px-M8-N32": Workload("resnet18", 3, 32, num_tasks=8, task_size=32),   # issue 16's target size
    "resnet18-32px-M8-N128": Workload("resnet18", 3, 32, num_tasks=8, task_size=128),  # its other size: 10 GiB, 45 min
}
DEFAULT_WORKLOADS = ("convnet-M4-N8", "convnet-M8-N16", "resnet18-16px-M4-N8")
METHODS = ("fd", "hvp", "itd", "first_order")
TARGETS = {"fd": 1.5, "hvp": 2.0, "itd": 2.5}  # peak × the plain union step (issue 16)
QUICK = Workload("convnet", 1, 28, num_tasks=2, task_size=4, target_steps=2)


@dataclass
class Measurement:
    """One unit of work under the meters."""

    peak_bytes: int
    end_bytes: int
    ops: OpCounter
    syncs: SyncCounter
    meter: MemoryMeter


def warm_up(model, run, views) -> None:
    """One call on the first task, then ``.grad = None``: GeSSLStep's once-per-input-shape model check (a forward
    and backward on one task) stays out of the measured step, as in every later step of a training run."""
    run(views[:1])
    model.zero_grad(set_to_none=True)


def measure(run, views, breakdown: bool) -> Measurement:
    """Run ``run(views)`` once inside the memory meter and both counters."""
    with MemoryMeter(breakdown=breakdown) as meter, OpCounter() as ops, SyncCounter() as syncs:
        run(views)
    return Measurement(meter.peak_bytes, meter.end_bytes, ops, syncs, meter)


def channels_last_views(views: torch.Tensor) -> torch.Tensor:
    """The same values [M, 2, N, C, S, S] with every image laid out channels-last (channel stride 1)."""
    return views.permute(0, 1, 2, 4, 5, 3).contiguous().permute(0, 1, 2, 5, 3, 4)


def is_layer_sized(shape: tuple, numel: int, param_shapes, num_tasks: int) -> bool:
    """True when a tensor looks like one layer's parameters (or their gradient) for one or M tasks: its numel
    is n or M·n for a parameter of n ≥ 1024 values, and it ends in that parameter's trailing dims (per-task
    [M, O, I, k, k], grouped [M·O, I, k, k]) or, transposed, in its first dim."""
    for param_shape in param_shapes:
        count = param_shape.numel()
        if count < 1024 or numel not in (count, num_tasks * count) or not shape:
            continue
        tail = tuple(param_shape[1:]) or tuple(param_shape)
        if tuple(shape[len(shape) - len(tail):]) == tail or shape[-1] == param_shape[0]:
            return True
    return False


def peak_composition(meter: MemoryMeter, model: torch.nn.Module, num_tasks: int) -> dict[str, float]:
    """Bytes live at the peak by kind: ``theta_copies`` (flat [.., P] vectors, in units of M·P values) and
    their ``flat_mib``; ``layer_param_mib`` (:func:`is_layer_sized`: one layer's weights or gradients for one
    or M tasks); ``other_mib`` (activations, saved tensors, everything else)."""
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)
    shapes = [p.shape for p in params]
    flat_values = flat = layer = other = 0
    for allocation in meter.live_at_peak():
        numel = allocation.nbytes // allocation.dtype.itemsize
        if allocation.shape and allocation.shape[-1] == size:
            flat_values += numel
            flat += allocation.nbytes
        elif is_layer_sized(allocation.shape, numel, shapes, num_tasks):
            layer += allocation.nbytes
        else:
            other += allocation.nbytes
    return {"theta_copies": flat_values / (num_tasks * size), "flat_mib": flat / MIB,
            "layer_param_mib": layer / MIB, "other_mib": other / MIB}


def _mib(nbytes) -> str:
    return f"{nbytes / MIB:.2f}"


def memory_rows(name, workload, plain, steps, models) -> list[str]:
    rows = []
    for method, step in steps.items():
        parts = peak_composition(step.meter, models[method], workload.num_tasks)
        target = TARGETS.get(method)
        ratio = step.peak_bytes / plain.peak_bytes
        verdict = "–" if target is None else f"≤ {target}: {'met' if ratio <= target else 'missed'}"
        rows.append(f"| {name} | {method} | {_mib(plain.peak_bytes)} | {_mib(step.peak_bytes)} | {ratio:.2f} "
                    f"| {verdict} | {parts['theta_copies']:.1f} ({parts['flat_mib']:.2f}) "
                    f"| {parts['layer_param_mib']:.2f} | {parts['other_mib']:.2f} | {_mib(step.end_bytes)} |")
    return rows


def op_rows(name, workload, plain, steps) -> list[str]:
    passes = workload.ideal_passes
    plain_conv = sum(n for op, n in plain.ops.kernel_counts.items() if "convolution" in op)
    rows = []
    for method, step in steps.items():
        conv = sum(n for op, n in step.ops.kernel_counts.items() if "convolution" in op)
        ideal = passes * plain.ops.kernels
        rows.append(f"| {name} | {method} | {plain.ops.kernels} | {ideal} | {step.ops.kernels} | "
                    f"{step.ops.kernels / ideal:.2f} | {step.ops.total} | {conv} / {passes * plain_conv} |")
    return rows


def _sites(counter: Counter) -> str:
    return "; ".join(f"{count}× `{op.removeprefix('aten.')}` at {site or '(outside gessl_ext)'}"
                     for (op, _, site), count in counter.items()) or "–"


def sync_rows(name, steps) -> list[str]:
    return [f"| {name} | {method} | {step.syncs.count} | {_sites(step.syncs.by_site())} | "
            f"{_sites(step.syncs.by_site(step.syncs.host_reads))} |" for method, step in steps.items()]


def breakdown_lines(name, method, step, rows: int) -> list[str]:
    lines = [f"\n{name}, {method}: largest storage groups live at the peak ({_mib(step.peak_bytes)} MiB)\n",
             "| MiB | count | op | shape | call site |", "|---|---|---|---|---|"]
    for op, site, shape, count, nbytes in step.meter.peak_by_site()[:rows]:
        lines.append(f"| {_mib(nbytes)} | {count} | `{op.removeprefix('aten.')}` | {list(shape)} | {site or '–'} |")
    return lines


def conv_formats(workload, method, batching) -> tuple[Counter, Counter]:
    """Convolution input formats in the plain union step and the step, both with a channels-last model and
    channels-last views: Counters of (op, memory format)."""
    views = channels_last_views(workload.views())
    found = []
    for implementation, options in (("plain_union", {"channels_last": True}),
                                    ("gessl", {"channels_last": True, "task_batching": batching})):
        model, run = build(workload, implementation, method, **options)
        warm_up(model, run, views)
        with OpCounter() as ops:
            run(views)
        found.append(ops.conv_input_formats)
    return found[0], found[1]


def explain_step(workload, method, batching) -> list[str]:
    """Graph count, graph breaks and their distinct reasons from ``torch._dynamo.explain`` of one step."""
    import torch._dynamo

    _, step = build(workload, "gessl", method, task_batching=batching)
    explanation = torch._dynamo.explain(step)(workload.views())
    reasons = Counter()
    for reason in explanation.break_reasons:
        frames = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reason.user_stack if "gessl_ext" in f.filename]
        reasons[(reason.reason.splitlines()[0][:160], frames[-1] if frames else "–")] += 1
    lines = [f"\ntorch._dynamo.explain of one {method} step ({batching}) on {workload.name}, "
             f"λ = {workload.target_steps}: {explanation.graph_count} graphs, {explanation.graph_break_count} graph "
             f"breaks, {explanation.op_count} ops in graphs\n",
             "| breaks | reason | innermost gessl_ext frame |", "|---|---|---|"]
    lines += [f"| {count} | {reason} | {frame} |" for (reason, frame), count in reasons.most_common()]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batching", choices=("vmap", "loop"), default="vmap")
    parser.add_argument("--breakdown", type=int, default=0, metavar="ROWS",
                        help="print the ROWS largest storage groups live at each step's peak")
    parser.add_argument("--channels-last", action="store_true", help="check convolution input formats")
    parser.add_argument("--explain", action="store_true", help="torch._dynamo.explain of one step (smallest workload)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help=f"only {QUICK.name}, λ = {QUICK.target_steps} (a check of the script)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workloads = {"quick-" + QUICK.name: QUICK} if args.quick else {name: WORKLOADS[name] for name in args.workload}

    memory = ["| workload | hypergrad | plain union peak MiB | step peak MiB | × plain | target | θ-sized copies "
              "at peak: M·P units (MiB) | layer-sized MiB | activations + other MiB | live after step MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    ops = ["| workload | hypergrad | plain step kernels | × passes | step kernels | × (passes × plain) "
           "| step aten ops (with views) | convolution kernels: step / passes × plain |",
           "|---|---|---|---|---|---|---|---|"]
    syncs = ["| workload | hypergrad | syncs per step | sites | host-only scalar reads (no device sync) |",
             "|---|---|---|---|---|"]
    details = []
    for name, workload in workloads.items():
        views = workload.views()
        _, run = build(workload, "plain_union")
        plain = measure(run, views, breakdown=False)
        steps, models = {}, {}
        for method in args.method:
            models[method], run = build(workload, "gessl", method, task_batching=args.batching)
            warm_up(models[method], run, views)
            steps[method] = measure(run, views, breakdown=args.breakdown > 0)
            if args.breakdown:
                details += breakdown_lines(name, method, steps[method], args.breakdown)
        memory += memory_rows(name, workload, plain, steps, models)
        ops += op_rows(name, workload, plain, steps)
        syncs += sync_rows(name, steps)
        if args.channels_last:
            plain_formats, step_formats = conv_formats(workload, args.method[0], args.batching)
            details.append(f"\n{name}, {args.method[0]}, channels-last model and views: convolution inputs "
                           f"plain {dict(plain_formats)}; step {dict(step_formats)}")
    print(f"task_batching={args.batching}, {args.threads} threads, torch {torch.__version__}, K = 1, "
          f"passes = {next(iter(workloads.values())).ideal_passes}\n")
    print("\n".join(memory + [""] + ops + [""] + syncs + details))
    if args.explain:
        smallest = replace(QUICK, target_steps=QUICK.target_steps if args.quick else 10)
        print("\n".join(explain_step(smallest, args.method[0], args.batching)))


if __name__ == "__main__":
    main()
