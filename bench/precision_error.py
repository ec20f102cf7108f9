"""Hypergradient error of mixed precision, for every method (docs/hypergradients.md, "Mixed precision").

One GeSSL step (SimCLR τ = 0.5, K = 1, α = 0.05, τ_head = 0.1, M tasks of N pairs, standard-normal images) on
fp32 parameters, with the forward passes in fp32, under bf16 autocast and under fp16 autocast
(``autocast_dtype``), each compared with the exact hypergradient: ``itd`` in float64. Reported: relative L2
distances ‖g − g_ref‖ / ‖g_ref‖, median and maximum over seeds.

* Default table: every registered method (``fd`` at each ``--radii``) on a ReLU network and the same network with
  SiLU, λ = ``--target-steps``. Columns: the method's total error against float64 ``itd`` in each precision (its
  bias plus rounding), and low precision against the same method in fp32 (the rounding alone).
* ``--sensitivity``: ``itd`` only, for λ in ``--lambdas``: fp32 / bf16 / fp16 against float64, and fp32 computed
  along two kernel paths (``task_batching`` loop vs vmap) against each other. If an error is rounding amplified by
  the problem, it grows with λ in every precision alike and fp32's own spread grows with it; a dtype mistake (an
  fp32 quantity kept in low precision) would instead show at small λ and not in fp32.

    PYTHONPATH=. python bench/precision_error.py --device cpu --seeds 3 --out /tmp/precision.md
    PYTHONPATH=. python bench/precision_error.py --device cpu --sensitivity --seeds 2 --out /tmp/sensitivity.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fidelity_table import relative_distance, replace_relu  # noqa: E402

from gessl_ext import GeSSLStep, losses  # noqa: E402
from gessl_ext.hypergrad import FD, HYPERGRADIENTS  # noqa: E402
from gessl_ext.train.models import build_model  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = {  # name: (builder(image_size), channels, description)
    "convnet": (lambda size: build_model("convnet", 1, size), 1, "convnet (conv-ReLU-conv-ReLU-maxpool-linear)"),
    "convnet_silu": (lambda size: replace_relu(build_model("convnet", 1, size), nn.SiLU), 1,
                     "the same convnet with SiLU"),
    "convnet_bn": (lambda size: build_model("convnet_bn", 1, size), 1, "convnet with BatchNorm (ReLU)"),
    "resnet18": (lambda size: build_model("resnet18", 3, size), 3, "CIFAR-style ResNet-18 (BatchNorm, ReLU)"),
}


def hypergradient(model: nn.Module, views: torch.Tensor, dtype: torch.dtype, autocast, **step_kwargs) -> torch.Tensor:
    """dL/dθ [P] (float64 copy) of one step on a copy of ``model`` cast to ``dtype``."""
    model = copy.deepcopy(model).to(dtype)
    step = GeSSLStep(model, losses.SimCLR(0.5), autocast_dtype=autocast, warn_nonsmooth=False, **step_kwargs)
    out = step(views.to(dtype))
    if out.skipped:
        raise RuntimeError(f"the step was skipped (non-finite values): {step_kwargs}, {dtype}, autocast {autocast}")
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def _inputs(args, model_name: str, seed: int, device):
    build, channels, _ = MODELS[model_name]
    torch.manual_seed(seed)
    model = build(args.image_size).to(device)
    views = torch.randn(args.tasks, 2, args.pairs, channels, args.image_size, args.image_size, device=device)
    return model, views


def _summary(samples: dict) -> dict:
    return {label: {col: (statistics.median(v), max(v)) for col, v in row.items()} for label, row in samples.items()}


def measure_methods(args, model_name: str, device, log) -> dict:
    """{method label: {column: (median, max) over seeds}} for every method in every precision."""
    settings = [(name, name) for name in HYPERGRADIENTS if name != "fd"] + [(f"fd r = {r:g}", FD(radius=r))
                                                                          for r in args.radii]
    samples: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        model, views = _inputs(args, model_name, seed, device)
        common = dict(inner_lr=0.05, inner_steps=1, target_steps=args.target_steps, head_temperature=0.1,
                      task_batching=args.batching)
        start = time.perf_counter()
        exact = hypergradient(model, views, torch.float64, None, hypergrad="itd", **common)
        for label, method in settings:
            grads = {p: hypergradient(model, views, torch.float32, dt, hypergrad=method, **common)
                     for p, dt in PRECISIONS.items()}
            row = samples.setdefault(label, {})
            for p, g in grads.items():
                row.setdefault(f"{p} vs exact", []).append(relative_distance(g, exact))
            for p in ("bf16", "fp16"):
                row.setdefault(f"{p} vs fp32", []).append(relative_distance(grads[p], grads["fp32"]))
        log(f"{model_name} seed {seed}: {time.perf_counter() - start:.1f} s")
    return _summary(samples)


def measure_sensitivity(args, model_name: str, device, log) -> dict:
    """{"λ = ...": {column: (median, max)}} for ``itd`` at each λ."""
    samples: dict[str, dict[str, list[float]]] = {}
    for lam in args.lambdas:
        for seed in range(args.seeds):
            model, views = _inputs(args, model_name, seed, device)
            common = dict(inner_lr=0.05, inner_steps=1, target_steps=lam, head_temperature=0.1, hypergrad="itd")
            start = time.perf_counter()
            exact = hypergradient(model, views, torch.float64, None, task_batching="loop", **common)
            fp32_vmap = hypergradient(model, views, torch.float32, None, task_batching="vmap", **common)
            grads = {p: hypergradient(model, views, torch.float32, dt, task_batching="loop", **common)
                     for p, dt in PRECISIONS.items()}
            row = samples.setdefault(f"λ = {lam}", {})
            for p, g in grads.items():
                row.setdefault(f"{p} vs exact", []).append(relative_distance(g, exact))
            row.setdefault("fp32 loop vs fp32 vmap", []).append(relative_distance(grads["fp32"], fp32_vmap))
            log(f"{model_name} λ = {lam} seed {seed}: {time.perf_counter() - start:.1f} s")
    return _summary(samples)


def markdown(results: dict, args, device, command: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    what = "`itd`, λ sweep" if args.sensitivity else f"every method, λ = {args.target_steps}"
    lines = [
        f"{what}; M = {args.tasks}, N = {args.pairs}, {args.image_size}×{args.image_size} inputs, K = 1, α = 0.05, "
        f"τ_head = 0.1, SimCLR (τ = 0.5); {name}, torch {torch.__version__}, {datetime.date.today()}; "
        f"relative L2 distance, median / max over {args.seeds} seed(s); exact = float64 `itd`. Command: `{command}`",
    ]
    for model_name, rows in results.items():
        columns = list(next(iter(rows.values())))
        lines += ["", f"{MODELS[model_name][2]}:", "",
                  "| " + ("λ" if args.sensitivity else "method") + " | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for label, row in rows.items():
            lines.append(f"| {label} | " + " | ".join(f"{row[c][0]:.2g} / {row[c][1]:.2g}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="convnet,convnet_silu", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--target-steps", type=int, default=3, help="λ of the method table (default 3)")
    parser.add_argument("--batching", default="loop", choices=("loop", "vmap"),
                        help="task_batching of the method table (default loop)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--radii", default="0.01,0.1", help="comma-separated fd radii (default 0.01,0.1)")
    parser.add_argument("--sensitivity", action="store_true", help="the λ sweep of itd instead of the method table")
    parser.add_argument("--lambdas", default="1,3,10", help="comma-separated λ of --sensitivity (default 1,3,10)")
    parser.add_argument("--out", help="also write the markdown to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown:
        parser.error(f"--models must name some of {', '.join(MODELS)}; unknown: {', '.join(unknown) or '(none given)'}")
    for name in ("tasks", "pairs", "seeds", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.target_steps < 1:
        parser.error("--target-steps must be >= 1 (with λ = 0 the target is θᴷ itself and the hypergradient is 0)")
    try:
        args.radii = [float(r) for r in args.radii.split(",") if r]
        args.lambdas = [int(v) for v in args.lambdas.split(",") if v]
    except ValueError as error:
        parser.error(f"--radii / --lambdas: {error}")
    if not args.radii or any(not r > 0 for r in args.radii):
        parser.error(f"--radii must be positive numbers, got {args.radii!r}")
    if not args.lambdas or any(v < 1 for v in args.lambdas):
        parser.error(f"--lambdas must be integers >= 1, got {args.lambdas!r}")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    measure = measure_sensitivity if args.sensitivity else measure_methods
    results = {m: measure(args, m, device, log) for m in models}
    command = "PYTHONPATH=. python bench/precision_error.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(results, args, device, command.strip())
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
