"""The per-task-loop baseline of bench/ computes the same step as GeSSLStep (float64)."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gessl_ext import GeSSLStep, losses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from baseline_loop import BaselineLoopStep  # noqa: E402

CONFIG = dict(inner_lr=0.3, inner_steps=2, target_steps=3, head_temperature=0.2)
# fd: both sides evaluate the same central difference, so only rounding (amplified by 1/2ε) differs.
TOLERANCE = {"itd": 1e-10, "hvp": 1e-10, "fd": 1e-8}


def small_bn_convnet():
    """Two BatchNorm layers (one with cumulative-average running stats), a ReLU and a max-pool."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, momentum=None), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    ).double()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def run_both(method, model, views, **extra):
    """(core model, baseline model, core output, baseline output) after one step from equal weights."""
    core_model, base_model = model, copy.deepcopy(model)
    core = GeSSLStep(core_model, losses.SimCLR(temperature=0.5), hypergrad=method, warn_nonsmooth=False,
                     **CONFIG, **extra)
    base = BaselineLoopStep(base_model, losses.SimCLR(temperature=0.5), hypergrad=method, **CONFIG, **extra)
    return core_model, base_model, core(views), base(views)


@pytest.mark.parametrize("method", ["itd", "hvp", "fd"])
def test_same_hypergradient_loss_and_running_stats(method):
    model = small_bn_convnet()
    views = torch.randn(3, 2, 5, 2, 8, 8, dtype=torch.float64)
    core_model, base_model, core_out, base_out = run_both(method, model, views)

    core_grad = flat(p.grad for p in core_model.parameters())
    base_grad = flat(p.grad for p in base_model.parameters())
    assert core_grad.norm() > 0
    assert rel(base_grad, core_grad) < TOLERANCE[method]
    torch.testing.assert_close(base_out.kl, core_out.kl, rtol=1e-12, atol=0)
    torch.testing.assert_close(base_out.loss, core_out.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(base_out.ssl_loss, core_out.ssl_loss, rtol=1e-12, atol=0)
    core_stats, base_stats = dict(core_model.named_buffers()), dict(base_model.named_buffers())
    for name, value in core_stats.items():
        torch.testing.assert_close(base_stats[name], value, rtol=1e-12, atol=1e-14, msg=name)
    assert int(base_stats["1.num_batches_tracked"]) == 3  # one update per task, not per pass


def test_accumulates_into_existing_grad():
    model = small_bn_convnet()
    views = torch.randn(2, 2, 4, 2, 8, 8, dtype=torch.float64)
    reference = copy.deepcopy(model)
    BaselineLoopStep(reference, losses.SimCLR(), hypergrad="hvp", **CONFIG)(views)
    offset = [torch.randn_like(p) for p in model.parameters()]
    for p, o in zip(model.parameters(), offset):
        p.grad = o.clone()
    BaselineLoopStep(model, losses.SimCLR(), hypergrad="hvp", **CONFIG)(views)
    for p, r, o in zip(model.parameters(), reference.parameters(), offset):
        torch.testing.assert_close(p.grad, r.grad + o, rtol=1e-12, atol=1e-14)


def test_bf16_autocast_matches_core():
    """The autocast path the GPU suite uses: same casts on both sides (float32 model, CPU bf16 autocast)."""
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8))
    views = torch.randn(2, 2, 6, 6)
    core_model, base_model, core_out, base_out = run_both("itd", model, views, autocast_dtype=torch.bfloat16)
    core_grad = flat(p.grad for p in core_model.parameters())
    assert rel(flat(p.grad for p in base_model.parameters()), core_grad) < 1e-4
    torch.testing.assert_close(base_out.kl, core_out.kl, rtol=1e-5, atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="hypergrad"):
        BaselineLoopStep(nn.Linear(3, 3), losses.SimCLR(), hypergrad="neumann")

    class Bilinear(losses.PairObjective):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.eye(3))

        def pair_loss(self, z1, z2):
            return ((z1 @ self.weight - z2) ** 2).mean()

    with pytest.raises(ValueError, match="trainable parameters"):
        BaselineLoopStep(nn.Linear(3, 3), Bilinear())
