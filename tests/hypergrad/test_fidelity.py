"""The finding of issue 9: on ReLU / max-pool networks the finite-difference HVP is biased and does not
converge as r → 0, while the exact ``hvp`` matches ``itd``; GeSSLStep warns about ``fd`` on such models."""
import warnings

import pytest
import torch
from torch import nn

from gessl_ext import GeSSLStep, NonSmoothModelWarning, losses
from gessl_ext.hypergrad import FD
from hypergrad_test_utils import rel_err, smooth_mlp, step_hypergradient

SIMCLR = losses.SimCLR(temperature=0.5)
STEP = dict(inner_lr=0.05, inner_steps=1, target_steps=3, head_temperature=0.1, warn_nonsmooth=False)
RADII = (1e-2, 1e-3, 1e-4)


def convnet(activation, pool):
    """conv3×3(1→4) → act → conv3×3(4→4) → act → 2×2 pool → linear(→16) for 48×48 inputs (float64).

    Few weights but ~57k activations per image, so ~1.8M ReLU units and 0.5M max-pool windows per task of
    2×8 images: enough that some of them switch inside the difference stencil at every radius down to 1e-4.
    """
    return nn.Sequential(nn.Conv2d(1, 4, 3), activation(), nn.Conv2d(4, 4, 3), activation(), pool(2), nn.Flatten(),
                         nn.Linear(4 * 22 * 22, 16)).double()


def fd_errors(model, views):
    """(relative error of hvp, [relative error of fd at each radius in RADII]) against itd."""
    exact, _ = step_hypergradient(model, views, SIMCLR, hypergrad="itd", **STEP)
    hvp, _ = step_hypergradient(model, views, SIMCLR, hypergrad="hvp", **STEP)
    fd = [rel_err(step_hypergradient(model, views, SIMCLR, hypergrad=FD(radius=r), **STEP)[0], exact)
          for r in RADII]
    return rel_err(hvp, exact), fd


def test_on_a_relu_maxpool_net_hvp_is_exact_and_fd_does_not_converge():
    """fd's error stays O(0.1) from r = 1e-2 to 1e-4 instead of falling ×1e4 (seeds 0–11 checked: the smallest
    fd error was 0.039, the smallest ratio error(1e-4) / error(1e-2) 0.5)."""
    views = torch.randn(2, 2, 8, 1, 48, 48, dtype=torch.float64)
    hvp_error, fd = fd_errors(convnet(nn.ReLU, nn.MaxPool2d), views)
    assert hvp_error < 1e-8
    assert min(fd) > 1e-2, fd
    assert fd[-1] > 0.1 * fd[0], fd


def test_the_same_net_made_smooth_lets_fd_converge():
    """SiLU for ReLU, average- for max-pooling: fd's error falls as r² (×1e4 over the two decades)."""
    views = torch.randn(2, 2, 8, 1, 48, 48, dtype=torch.float64)
    hvp_error, fd = fd_errors(convnet(nn.SiLU, nn.AvgPool2d), views)
    assert hvp_error < 1e-8
    assert fd[-1] < 1e-6 and fd[-1] < 1e-3 * fd[0], fd


# --- the NonSmoothModelWarning ---------------------------------------------------------------------

def nonsmooth_warnings(model, steps=2, **kwargs):
    """NonSmoothModelWarnings raised by constructing a GeSSLStep and running ``steps`` steps."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = GeSSLStep(model, SIMCLR, inner_lr=0.05, target_steps=1, **kwargs)
        for _ in range(steps):
            step(torch.randn(2, 2, 4, 6, dtype=torch.float64))
    return [w for w in caught if issubclass(w.category, NonSmoothModelWarning)]


def relu_mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()


def test_fd_on_a_relu_model_warns_once_pointing_to_hvp_and_the_switch():
    caught = nonsmooth_warnings(relu_mlp(), hypergrad="fd")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "ReLU" in message and "hvp" in message and "warn_nonsmooth=False" in message


def test_fd_on_a_maxpool_model_warns():
    model = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Tanh(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(3, 4)).double()
    caught = nonsmooth_warnings(model, hypergrad="fd")
    assert len(caught) == 1 and "MaxPool1d" in str(caught[0].message)


@pytest.mark.parametrize("make_model, kwargs", [
    (relu_mlp, dict(hypergrad="hvp")),
    (relu_mlp, dict(hypergrad="itd")),
    (relu_mlp, dict(hypergrad="fd", warn_nonsmooth=False)),
    (smooth_mlp, dict(hypergrad="fd")),
], ids=["relu-hvp", "relu-itd", "relu-fd-silenced", "smooth-fd"])
def test_no_warning_for_exact_methods_smooth_models_or_when_silenced(make_model, kwargs):
    assert nonsmooth_warnings(make_model(), **kwargs) == []
