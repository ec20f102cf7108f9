"""What one vmapped GeSSLStep holds at its memory peak, read with bench/memory_meter.py (issue 16): the counts of
per-task parameter copies and activation sets that the step's design promises, on models where each dominates."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gessl_ext import GeSSLStep, losses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from memory_meter import MemoryMeter  # noqa: E402

SIMCLR = losses.SimCLR(temperature=0.5)


def step_peak(model: nn.Module, views: torch.Tensor, hypergrad: str) -> int:
    """Peak live tensor bytes of the second of two vmapped steps (the first one checks the model)."""
    step = GeSSLStep(model, SIMCLR, inner_lr=0.05, target_steps=2, hypergrad=hypergrad, task_batching="vmap",
                     warn_nonsmooth=False)
    step(views)
    with MemoryMeter() as meter:
        step(views)
    return meter.peak_bytes


def plain_step_peak(model: nn.Module, views: torch.Tensor) -> int:
    """Peak live tensor bytes of the second of two plain SimCLR training steps on the union of the tasks' images."""
    def plain_step():
        z1, z2 = model(views.transpose(0, 1).reshape(-1, *views.shape[3:])).chunk(2)
        SIMCLR.pair_loss(z1, z2).backward()

    plain_step()
    with MemoryMeter() as meter:
        plain_step()
    return meter.peak_bytes


def test_fd_passes_and_target_steps_hold_three_parameter_copies():
    """A wide MLP on 4 inputs per view: the per-task parameter copies [M, P] are nearly all of the memory. The
    finite-difference passes hold u, one perturbed point and the gradient's per-parameter pieces (folded into u
    piece by piece, never concatenated); the target's steps hold θᴷ, the target's iterate (updated in place after
    its first step) and the gradient's pieces: 3 copies each, plus the shared θ (1/M of a copy) and the activations.
    Measured 3.74 (fd: one more temporary of the largest gradient piece in the fold) and 3.50 (first_order); before,
    θ + εu, θ − εu and θᴷ were alive together (6.5 copies), then the flat gradient and the target's second iterate
    (4.5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 512), nn.Tanh(), nn.Linear(512, 16)).double()
    views = torch.randn(4, 2, 4, 16, dtype=torch.float64)
    copy = 4 * sum(p.numel() for p in model.parameters()) * 8       # M · P float64 values
    first_order, fd = step_peak(model, views, "first_order"), step_peak(model, views, "fd")
    assert first_order / copy < 3.6 and fd / copy < 3.8, (fd / copy, first_order / copy)


def test_convolution_weights_are_not_copied_per_pass():
    """Convolutions with most of the parameters, on 8×8 images. Under vmap a weight sliced from a flat [M, P] vector is
    strided by P, and a batched convolution copies it and keeps the copy for its backward: one more per-task copy at
    the start of every backward at such a point. The finite-difference points and the target's iterate are
    per-parameter tensors (``point_from_flat``, ``stepped``), which the convolutions use as they are. Measured 4.98
    (fd) and 4.97 (first_order) per-task copies, activations included; 5.95 for both with flat points."""
    def convnet() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.Tanh(), nn.Conv2d(128, 128, 3, padding=1), nn.Tanh(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()

    views = torch.randn(4, 2, 4, 3, 8, 8, dtype=torch.float64)
    copy = 4 * sum(p.numel() for p in convnet().parameters()) * 8       # M · P float64 values
    fd, first_order = step_peak(convnet(), views, "fd") / copy, step_peak(convnet(), views, "first_order") / copy
    assert fd < 5.3 and first_order < 5.3, (fd, first_order)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_running_statistics_cost_no_activation_set(momentum):
    """A small convnet on 32×32 images: activations are nearly all of the memory. The task's first pass updates
    the BatchNorm running-statistics copies; recorded and applied after the gradient transform it holds one
    activation set like any other pass (in place inside torch.func.grad_and_value, it held one more)."""
    def convnet(track: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum, track_running_stats=track), nn.Tanh(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum, track_running_stats=track), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()

    views = torch.randn(2, 2, 8, 3, 32, 32, dtype=torch.float64)
    tracked, untracked = step_peak(convnet(True), views, "fd"), step_peak(convnet(False), views, "fd")
    assert tracked <= 1.02 * untracked, tracked / untracked


def test_target_steps_hold_no_graph_whatever_the_method_records():
    """One task at a time, ``itd`` records the inner loop's graph, so θᴷ carries one; an objective that embeds each
    view itself (no shared forward) takes the target's first gradient at that θᴷ. The target's iterate must not carry
    a graph on: the peak of a step stays the same from λ = 2 to λ = 12 (it grew by a graph per target step)."""
    class SeparateViews(losses.SimCLR):
        embeds_views_once = False

    def peak(target_steps):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 16)).double()
        step = GeSSLStep(model, SeparateViews(temperature=0.5), target_steps=target_steps, hypergrad="itd",
                         task_batching="loop")
        views = torch.randn(2, 2, 4, 16, dtype=torch.float64)
        step(views)
        with MemoryMeter() as meter:
            step(views)
        return meter.peak_bytes

    short, long = peak(2), peak(12)
    assert long <= 1.02 * short, long / short


def test_each_pass_frees_its_activations_as_its_backward_goes():
    """A convnet whose first layers, at full resolution, hold most of the activations, which its backward reaches
    last. A pass that kept its saved activations until the end of its backward (the default of a torch.func.vjp
    pullback) would hold them all beneath the backward's temporaries there: 1.62× the plain union step for fd, where
    freeing them as the backward goes gives 1.20× (the per-task parameter copies are small here)."""
    def convnet() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16, track_running_stats=False), nn.Tanh(),
            nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(), nn.AvgPool2d(4), nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()

    views = torch.randn(2, 2, 8, 3, 32, 32, dtype=torch.float64)
    ratio = step_peak(convnet(), views, "fd") / plain_step_peak(convnet(), views)
    assert ratio < 1.35, ratio


def test_itd_reverses_batchnorm_twice_holding_its_input_and_gradient_only():
    """``itd`` under vmap differentiates a gradient pass in reverse mode, through a BatchNorm convnet whose activations
    are nearly all of the memory. Each BatchNorm runs as gessl_ext.batch_norm.normalize, whose second derivative keeps
    the layer's input and the gradient reaching it; from elementary ops it also kept the centred input and the normalised
    one (and the centred input again in the gradient's graph). Measured 1.98× the plain union step; 2.14× from
    elementary ops written as x·s + (b − μ·s), 3.27× from (x − μ)·r·w + b."""
    def convnet() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()

    views = torch.randn(2, 2, 8, 3, 32, 32, dtype=torch.float64)
    ratio = step_peak(convnet(), views, "itd") / plain_step_peak(convnet(), views)
    assert ratio < 2.1, ratio
