"""Encoders users bring × hypergradient method × task batching: the right hypergradient, checked against
independent references in float64 (docs/models.md has the table this matrix fills).

Each model is scaled down to run in about a second on the CPU (torchvision's own classes at tiny widths):

* ``resnet18``: torchvision's ResNet with BasicBlock × [2, 2, 2, 2] at width 4 (BatchNorm, ReLU, max-pool);
* ``mobilenet_v3_small`` at width 0.25 (Hardswish, squeeze-excitation with Hardsigmoid, Dropout);
* ``convnext``: torchvision's ConvNeXt with two one-block stages (LayerNorm2d, GELU, layer scale, stochastic depth);
* ``vit``: torchvision's VisionTransformer, one layer, width 8 (attention with dropout, LayerNorm, GELU);
* ``gru``: a GRU reading the 8 rows of an 8×8 image;
* ``tied_frozen_buffers``: tied weights, a frozen layer, buffers and a head the embedding never uses;
* ``reparametrised``: a weight used as base + delta and a parameter used only through its sum (gradients that
  autograd hands out aliased or expanded).

References: ``hvp`` and ``itd`` against the exact unrolled per-task autograd step (tests/reference.py),
``first_order`` against its ∂L/∂θᴷ, ``fd`` against the independent per-task finite-difference baseline
(bench/baseline_loop.py) and, on the smooth models, against the exact value within its O(r²) truncation.
Stochastic layers follow GeSSL's rule (randomness.RandomStreams): the references re-seed every forward of task l with
seed + l. The vmap path of a stochastic model runs one task per chunk, where its draws are the loop's and so the
references' (for a chunk of several tasks vmap draws other masks; tests/models/test_model_kinds.py checks that
case against a fixed-mask reference).
"""
import copy
import functools
import warnings

import pytest
import torch
from torch import nn

from bench.baseline_loop import BaselineLoopStep
from gessl_ext import GeSSLStep, losses
from gessl_ext.hypergrad import FD
from reference import flat, reference_step, rel

torchvision = pytest.importorskip("torchvision")
from torchvision.models.convnext import CNBlockConfig, ConvNeXt  # noqa: E402
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402

SIMCLR = losses.SimCLR(temperature=0.5)
INNER_LR, INNER_STEPS, TARGET_STEPS, TAU = 0.05, 1, 1, 0.1
RADIUS = 1e-3
EXACT = 1e-8
FD_VS_BASELINE = 1e-5  # the same central difference: rounding (and Hardsigmoid's rewrite) amplified by 1/ε
FD_TRUNCATION = 1e-3  # fd − exact on smooth models at r = 1e-3: O(r²), measured ≤ 2.2e-4 (ViT)


def resnet18(width=4):
    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=8)
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(BasicBlock, width, 2)
    net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
    net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
    net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
    net.fc = nn.Linear(8 * width, 8)
    return net


def vit():
    net = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=16, num_classes=8, attention_dropout=0.1)
    nn.init.normal_(net.heads.head.weight)  # torchvision starts the head at zero: every embedding equal
    return net


class GRUEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 12, batch_first=True)
        self.out = nn.Linear(12, 8)

    def forward(self, x):
        rows, _ = self.rnn(x.reshape(x.shape[0], 8, 8))
        return self.out(rows[:, -1])


class TiedFrozenBuffers(nn.Module):
    """mix2 shares mix1's weight; `frozen` does not train; a scale/shift buffer; `unused` never runs."""

    def __init__(self):
        super().__init__()
        self.inp, self.frozen, self.out = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.mix1, self.mix2 = nn.Linear(16, 16), nn.Linear(16, 16)
        self.mix2.weight = self.mix1.weight
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))
        self.register_buffer("shift", torch.randn(16))
        self.unused = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)) * self.scale + self.shift)
        h = torch.tanh(self.mix2(torch.tanh(self.mix1(torch.tanh(self.frozen(h))))))
        return self.out(h)


class Reparametrised(nn.Module):
    """A weight used as base + delta (LoRA-style: autograd hands both the same gradient tensor) and a gate that enters
    only through its sum (its gradient is one value expanded, stride 0)."""

    def __init__(self):
        super().__init__()
        self.base = nn.Parameter(0.4 * torch.randn(16, 64))
        self.delta = nn.Parameter(0.1 * torch.randn(16, 64))
        self.gate = nn.Parameter(torch.full((4,), 0.25))
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.tanh(nn.functional.linear(x.flatten(1), self.base + self.delta)) * self.gate.sum())


# name: (builder, input shape, smooth (fd converges), stochastic layers)
ZOO = {
    "resnet18": (resnet18, (3, 16, 16), False, False),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=8),
                           (3, 16, 16), False, True),
    "convnext": (lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.2,
                                  num_classes=8), (3, 16, 16), True, True),
    "vit": (vit, (3, 16, 16), True, True),
    "gru": (GRUEncoder, (1, 8, 8), True, False),
    "tied_frozen_buffers": (TiedFrozenBuffers, (1, 8, 8), True, False),
    "reparametrised": (Reparametrised, (1, 8, 8), True, False),
}
METHODS = {"fd": FD(radius=RADIUS), "hvp": "hvp", "itd": "itd", "first_order": "first_order"}
SEED = 1234  # the step's random streams: seed + l for task l, seed = randint(2**62) after manual_seed(SEED)


def build(name):
    torch.manual_seed(0)
    return ZOO[name][0]().double()


def views_for(name):
    torch.manual_seed(1)
    return torch.randn(2, 2, 2, *ZOO[name][1], dtype=torch.float64)


def stream_seed():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return int(torch.randint(2**62, ()))


class _TwiceDifferentiableHardsigmoid(nn.Module):
    """The reference's own Hardsigmoid (torch's has no double backward): clamp(x / 6 + 1/2, 0, 1)."""

    def forward(self, x):
        return torch.clamp(x / 6 + 0.5, 0.0, 1.0)


def _reference_model(model):
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Hardsigmoid):
                setattr(parent, child_name, _TwiceDifferentiableHardsigmoid())
    return model


def _trainable_grads(model, names=None):
    """Flat .grad of the named parameters (default: the trainable ones), zeros where .grad is None."""
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    return flat([named[n].grad if named[n].grad is not None else torch.zeros_like(named[n]) for n in names])


@functools.lru_cache(maxsize=None)
def references(name):
    """(exact dL/dθ, first-order ∂L/∂θᴷ, the baseline's fd) for the zoo model, flat over trainable parameters."""
    model, views = build(name), views_for(name)
    seed = stream_seed() if ZOO[name][3] else None
    ref_model = _reference_model(model)
    exact, _, _ = reference_step(ref_model, SIMCLR.pair_loss, views, INNER_LR, INNER_STEPS, TARGET_STEPS, TAU, seed=seed)
    first, _, _ = reference_step(ref_model, SIMCLR.pair_loss, views, INNER_LR, INNER_STEPS, TARGET_STEPS, TAU,
                                 first_order=True, seed=seed)
    baseline_model = copy.deepcopy(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if name == "tied_frozen_buffers":  # the baseline differentiates every trainable parameter: leave out the unused
        baseline_model.unused.requires_grad_(False)
    if seed is not None:  # the baseline runs one forward per pass; re-seed each with its task's stream
        tasks = [torch.cat([task[0], task[1]]) for task in views]

        def reseed(module, args):
            (index,) = [i for i, x in enumerate(tasks) if x.shape == args[0].shape and torch.equal(x, args[0])]
            torch.manual_seed(seed + index)

        baseline_model.register_forward_pre_hook(reseed)
    with torch.random.fork_rng(devices=[]):
        BaselineLoopStep(baseline_model, SIMCLR, inner_lr=INNER_LR, inner_steps=INNER_STEPS, target_steps=TARGET_STEPS,
                         hypergrad="fd", head_temperature=TAU, fd_radius=RADIUS)(views)
    return flat(exact), flat(first), _trainable_grads(baseline_model, trainable)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_hypergradient_equals_the_references(name, method, batching):
    model, views = build(name), views_for(name)
    stochastic, smooth = ZOO[name][3], ZOO[name][2]
    chunk = 1 if batching == "vmap" and stochastic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NonSmoothModelWarning for fd on ReLU/Hardswish models: that is the point
        step = GeSSLStep(model, SIMCLR, inner_lr=INNER_LR, inner_steps=INNER_STEPS, target_steps=TARGET_STEPS,
                         hypergrad=METHODS[method], head_temperature=TAU, task_batching=batching, task_chunk_size=chunk)
    torch.manual_seed(SEED)
    out = step(views)
    assert not out.skipped
    got = _trainable_grads(model)
    exact, first, baseline_fd = references(name)
    if method in ("hvp", "itd"):
        assert rel(got, exact) < EXACT
    elif method == "first_order":
        assert rel(got, first) < EXACT
    else:
        assert rel(got, baseline_fd) < FD_VS_BASELINE
        if smooth:
            assert rel(got, exact) < FD_TRUNCATION
    if name == "tied_frozen_buffers":  # the head the embedding never uses keeps .grad None, like loss.backward()
        assert model.unused.weight.grad is None and model.frozen.weight.grad is None
