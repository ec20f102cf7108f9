"""Regenerate the hypergradient-fidelity table of issue 9 (docs/hypergradients.md).

For each model, one GeSSL step (SimCLR, K = 1 inner step, λ = 3 target steps, α = 0.05, τ_head = 0.1) is
computed in float64 on the CPU with every hypergradient method, and each is reported as its relative
distance ‖g − g_itd‖ / ‖g_itd‖ from the exact unrolled hypergradient (``itd``). Two independent exact
computations back the reference up: ``itd`` once more through the plain per-task autograd loop of
bench/baseline_loop.py (column "itd, autograd loop"), and ``hvp`` (a different algorithm: the reverse
recursion with double-backward HVPs).

    PYTHONPATH=. python bench/fidelity_table.py                       # all three models, ~30 min on 2 cores
    PYTHONPATH=. python bench/fidelity_table.py --models convnet --out /tmp/table.md
    PYTHONPATH=. python bench/fidelity_table.py --costs               # the cost table instead (see below)

Models: ``resnet18`` (CIFAR ResNet-18 with BatchNorm and ReLU, M = 2 tasks of N = 8 3×32×32 pairs),
``resnet18_silu`` (the same with every ReLU replaced by SiLU), ``convnet`` (conv-ReLU-conv-ReLU-maxpool-
linear, M = 3 tasks of N = 8 1×28×28 pairs). Inputs are standard-normal images from a fixed seed.

``--costs`` times instead what each method costs in float32 on the CPU for the convnet (M = 4, N = 32,
K = 1 and 3): one gradient pass ∇ℓ(θ), one exact HVP by double backward and by forward-over-reverse, and a
whole GeSSL step per method; each the minimum over interleaved repeats of the process CPU time on one thread
(robust to other load on a shared machine), the step's cost above ``first_order`` expressed in gradient passes.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baseline_loop import BaselineLoopStep  # noqa: E402

from gessl_ext import GeSSLStep, losses  # noqa: E402
from gessl_ext.hypergrad import FD  # noqa: E402
from gessl_ext.train.models import build_model  # noqa: E402

STEP = dict(inner_lr=0.05, inner_steps=1, target_steps=3, head_temperature=0.1)
TEMPERATURE = 0.5
RADII = (0.1, 0.01, 1e-3, 1e-4)


@dataclass(frozen=True)
class Workload:
    label: str
    build: Callable[[], nn.Module]
    num_tasks: int
    pairs: int
    input_shape: tuple


def replace_relu(module: nn.Module, activation: Callable[[], nn.Module]) -> nn.Module:
    """Replace every nn.ReLU submodule (in place) by ``activation()``; returns the module."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, activation())
        else:
            replace_relu(child, activation)
    return module


WORKLOADS = {
    "resnet18": Workload("CIFAR-style ResNet-18 (BatchNorm, ReLU)", lambda: build_model("resnet18", 3, 32), 2, 8,
                         (3, 32, 32)),
    "resnet18_silu": Workload("the same ResNet-18 with every ReLU replaced by SiLU",
                              lambda: replace_relu(build_model("resnet18", 3, 32), nn.SiLU), 2, 8, (3, 32, 32)),
    "convnet": Workload("convnet (conv-ReLU-conv-ReLU-maxpool-linear)", lambda: build_model("convnet", 1, 28), 3, 8,
                        (1, 28, 28)),
}


def hypergradient(model: nn.Module, views: torch.Tensor, method, **kwargs) -> tuple[torch.Tensor, float]:
    """(dL/dθ [P] of one step on a fresh copy of ``model``, wall seconds)."""
    model = copy.deepcopy(model)
    start = time.perf_counter()
    if kwargs.pop("baseline", False):
        BaselineLoopStep(model, losses.SimCLR(TEMPERATURE), hypergrad=method, **STEP, **kwargs)(views)
    else:
        GeSSLStep(model, losses.SimCLR(TEMPERATURE), hypergrad=method, warn_nonsmooth=False, **STEP, **kwargs)(views)
    seconds = time.perf_counter() - start
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), seconds


def relative_distance(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference))


def measure(workload: Workload, seed: int, log) -> dict:
    """Relative distances from itd of every method on one workload (wall times go to ``log`` only)."""
    torch.manual_seed(seed)
    model = workload.build().double()
    views = torch.randn(workload.num_tasks, 2, workload.pairs, *workload.input_shape, dtype=torch.float64)
    runs = {"itd": dict(method="itd", task_batching="loop"),
            "itd, autograd loop": dict(method="itd", baseline=True),
            "first_order": dict(method="first_order", task_batching="loop"),
            **{f"fd r = {r:g}": dict(method=FD(radius=r), task_batching="loop") for r in RADII},
            "hvp": dict(method="hvp", task_batching="loop")}
    grads = {}
    for name, kwargs in runs.items():
        grads[name], seconds = hypergradient(model, views, **kwargs)
        log(f"  {name}: {seconds:.1f} s")
    reference = grads.pop("itd")
    return {"distance": {name: relative_distance(g, reference) for name, g in grads.items()},
            "params": reference.numel()}


def markdown(results: dict, seed: int) -> str:
    columns = ["first_order", *[f"fd r = {r:g}" for r in RADII], "hvp", "itd, autograd loop"]
    lines = [
        f"Relative distance ‖g − g_itd‖ / ‖g_itd‖ of each method's hypergradient from the exact one (`itd`), "
        f"float64, CPU, SimCLR (temperature {TEMPERATURE}), K = {STEP['inner_steps']}, λ = {STEP['target_steps']}, "
        f"α = {STEP['inner_lr']}, τ_head = {STEP['head_temperature']}, standard-normal inputs, seed {seed}. "
        "Generated by `bench/fidelity_table.py`.",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, result in results.items():
        workload = WORKLOADS[key]
        label = f"{workload.label}, P = {result['params']:,}, M = {workload.num_tasks}, N = {workload.pairs}"
        lines.append(f"| {label} | " + " | ".join(f"{result['distance'][c]:.2g}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def min_seconds(calls: dict, repeats: int) -> dict:
    """{name: least process CPU seconds of calls[name]()} over ``repeats`` interleaved rounds (after a warm-up)."""
    best = dict.fromkeys(calls, float("inf"))
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.process_time()
            call()
            best[name] = min(best[name], time.process_time() - start)
    return best


def cost_table(repeats: int) -> str:
    """Markdown: float32 CPU seconds of a gradient pass, an exact HVP both ways, and a step of each method."""
    from torch.func import jvp, vjp

    from gessl_ext.tasks import TaskProblem

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("convnet", 1, 28)
    num_tasks, pairs = 4, 32
    views = torch.randn(num_tasks, 2, pairs, 1, 28, 28)
    task_model = GeSSLStep(model, losses.SimCLR(TEMPERATURE), warn_nonsmooth=False).task_model
    problem = TaskProblem(task_model, views[0, 0], views[0, 1], STEP["inner_lr"], task_model.constants())
    theta = task_model.flat_parameters()
    direction = torch.randn_like(theta)
    passes = min_seconds({
        "gradient pass ∇ℓ(θ)": lambda: problem.grad(theta),
        "HVP, double backward (vjp of ∇ℓ)": lambda: vjp(problem.grad, theta)[1](direction)[0],
        "HVP, forward-over-reverse (jvp of ∇ℓ)": lambda: jvp(problem.grad, (theta,), (direction,))[1],
    }, repeats)
    grad_seconds = passes["gradient pass ∇ℓ(θ)"]
    lines = [f"float32, CPU time on 1 thread, convnet (P = {theta.numel():,}), one task of N = {pairs} pairs; least "
             f"of {repeats} interleaved repeats. Generated by `bench/fidelity_table.py --costs`.", "",
             "| operation | CPU ms | gradient passes |", "|---|---|---|"]
    lines += [f"| {name} | {1e3 * sec:.0f} | {sec / grad_seconds:.2f} |" for name, sec in passes.items()]
    for inner_steps in (1, 3):
        steps = {method: (lambda method=method: GeSSLStep(
            model, losses.SimCLR(TEMPERATURE), hypergrad=method, warn_nonsmooth=False, task_batching="loop",
            **{**STEP, "inner_steps": inner_steps})(views))
            for method in ("first_order", "fd", "hvp", "itd", "neumann", "cg")}
        seconds = min_seconds(steps, repeats)
        base = seconds["first_order"]
        lines += ["", f"Whole step, M = {num_tasks} tasks, K = {inner_steps}, λ = {STEP['target_steps']}, "
                  "iters = 5 (loop over tasks):", "",
                  "| method | CPU s per step | × first_order | extra gradient passes per task |", "|---|---|---|---|"]
        lines += [f"| {method} | {sec:.2f} | {sec / base:.2f} | {(sec - base) / num_tasks / grad_seconds:.1f} |"
                  for method, sec in seconds.items()]
    model.zero_grad(set_to_none=True)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--costs", action="store_true", help="print the float32 cost table instead")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats for --costs (default 5)")
    args = parser.parse_args(argv)
    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in WORKLOADS]
    if unknown or not keys:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(WORKLOADS)}")

    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    if args.costs:
        table = cost_table(args.repeats)
    else:
        results = {}
        for key in keys:
            log(f"{key}:")
            results[key] = measure(WORKLOADS[key], args.seed, log)
        table = markdown(results, args.seed)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
