"""Mixed precision (``autocast_dtype``): bf16, fp16 × every hypergradient method × every task batching × norm layers.

Each case runs one GeSSL step with fp32 parameters under autocast and checks that the hypergradient is finite, that
``.grad`` keeps the parameters' dtype, that it is close to the same method's strict-fp32 hypergradient, and that
the loop, vmap and chunked-vmap results agree. Bounds are multiples of the dtype's unit roundoff u (bf16: 2⁻⁸,
fp16: 2⁻¹¹), set at twice the largest relative L2 distance measured over seeds 0–4 on these SiLU networks, every
batching (docs/hypergradients.md, "Mixed precision"):

* ``itd``, ``hvp``, ``first_order``: 30 u from fp32, 28 u between loop and vmap → bound 60 u (also for any method
  registered later);
* ``fd``: 77 u / 58 u → 160 u. It divides the rounding of two low-precision gradients by 2ε (ε = radius / ‖u‖);
* ``neumann``, ``cg`` (2 iterations, α = 0.002): 59 u / 36 u → 120 u. At the α = 0.02 of the other cases
  I + αH(θᴷ) is not positive definite for some of these tasks, where the solvers amplify rounding geometrically
  (in fp32 too, from a smaller start); bf16 / fp16 then gave up to 1.8 relative error (docs).

loop and vmap round differently (per-task vs grouped convolutions; HVPs by double backward vs forward-over-reverse),
so they differ about as much as each differs from fp32; chunked and whole vmap run the same kernels and agreed to
2e-5 → bound 1e-4.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from gessl_ext import GeSSLStep, losses
from gessl_ext.hypergrad import HYPERGRADIENTS
from gessl_ext.layers import NORM_LAYERS, norm_in_dtype, wrapped_forwards

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
BOUND_IN_U = {"fd": 160, "neumann": 120, "cg": 120}  # relative L2 distance, in units of u (see above)
DEFAULT_BOUND_IN_U = 60
CHUNKED_VS_VMAP = 1e-4
STEP = dict(inner_lr=0.02, inner_steps=1, target_steps=1, head_temperature=0.1, warn_nonsmooth=False)
STEP_OF_METHOD = {"neumann": dict(inner_lr=0.002), "cg": dict(inner_lr=0.002)}  # I + αH positive definite here
NUM_TASKS, PAIRS = 3, 3
BATCHINGS = {"loop": dict(task_batching="loop"), "vmap": dict(task_batching="vmap"),
             "chunked": dict(task_batching="vmap", task_chunk_size=2)}  # chunks of 2 < M = 3 (one full, one partial)


def _conv(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)  # no bias before a norm layer, as in ResNets


def _batchnorm_net():
    """BatchNorm2d (tracked), BatchNorm2d(track_running_stats=False) and BatchNorm1d in one SiLU net, 8×8 inputs."""
    return nn.Sequential(_conv(1, 4), nn.BatchNorm2d(4), nn.SiLU(),
                         _conv(4, 4, 2), nn.BatchNorm2d(4, track_running_stats=False), nn.SiLU(),
                         nn.Flatten(), nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 8))


NETWORKS = {
    "batchnorm_train": _batchnorm_net,
    "batchnorm_eval": lambda: _batchnorm_net().eval(),
    "groupnorm_layernorm": lambda: nn.Sequential(
        _conv(1, 4), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(),
        nn.Linear(256, 16, bias=False), nn.LayerNorm(16), nn.SiLU(), nn.Linear(16, 8)),
    "instancenorm": lambda: nn.Sequential(
        _conv(1, 4), nn.InstanceNorm2d(4, affine=True), nn.SiLU(),
        _conv(4, 4, 2), nn.InstanceNorm2d(4), nn.SiLU(), nn.Flatten(), nn.Linear(64, 8)),
}


def method_instance(name: str):
    """The registered method ``name`` with its default settings, except ``iters`` = 2 where it has one (fewer
    HVPs keep the matrix fast; the low-precision path, one HVP after another, is the same)."""
    cls = HYPERGRADIENTS[name]
    return cls(iters=2) if "iters" in {f.name for f in cls.settings()} else cls()


def hypergradient(model: nn.Module, views: torch.Tensor, method: str, autocast_dtype, batching: str) -> torch.Tensor:
    """dL/dθ [P] of one step on a copy of ``model``, read from ``.grad``, which must keep the parameters' dtype."""
    model = copy.deepcopy(model)
    step = {**STEP, **STEP_OF_METHOD.get(method, {}), **BATCHINGS[batching]}
    out = GeSSLStep(model, losses.SimCLR(0.5), hypergrad=method_instance(method), autocast_dtype=autocast_dtype,
                    **step)(views)
    assert not out.skipped, f"{method}, {batching}, {autocast_dtype}: the step found non-finite values"
    for p in model.parameters():
        assert p.grad.dtype == p.dtype == torch.float32
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.isfinite(grad).all()
    return grad


def relative_distance(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference))


@pytest.mark.parametrize("method", list(HYPERGRADIENTS))
@pytest.mark.parametrize("network", list(NETWORKS))
def test_mixed_precision_matrix(network, method):
    model = NETWORKS[network]()
    views = torch.randn(NUM_TASKS, 2, PAIRS, 1, 8, 8)
    reference = hypergradient(model, views, method, None, "loop")
    assert torch.linalg.vector_norm(reference) > 0
    for dtype, unit in UNIT_ROUNDOFF.items():
        bound = BOUND_IN_U.get(method, DEFAULT_BOUND_IN_U) * unit
        grads = {batching: hypergradient(model, views, method, dtype, batching) for batching in BATCHINGS}
        for batching, grad in grads.items():
            distance = relative_distance(grad, reference)
            assert distance < bound, f"{dtype} {batching}: {distance:.3g} from fp32 (bound {bound:.3g})"
        distance = relative_distance(grads["vmap"], grads["loop"])
        assert distance < bound, f"{dtype}: vmap {distance:.3g} from loop (bound {bound:.3g})"
        distance = relative_distance(grads["chunked"], grads["vmap"])
        assert distance < CHUNKED_VS_VMAP, f"{dtype}: chunked {distance:.3g} from whole vmap"


NORMS = {
    "batchnorm2d": lambda: nn.BatchNorm2d(4),
    "batchnorm2d_eval": lambda: nn.BatchNorm2d(4).eval(),
    "batchnorm2d_untracked": lambda: nn.BatchNorm2d(4, track_running_stats=False),
    "batchnorm1d": lambda: nn.BatchNorm1d(4),
    "layernorm": lambda: nn.LayerNorm(6),
    "groupnorm": lambda: nn.GroupNorm(2, 4),
    "instancenorm2d": lambda: nn.InstanceNorm2d(4),
    "instancenorm2d_affine": lambda: nn.InstanceNorm2d(4, affine=True),
}


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF))
@pytest.mark.parametrize("name", list(NORMS))
def test_norm_layer_under_autocast_and_vmap(name, dtype):
    """One norm layer, per-task weights under vmap and autocast: what failed with "expected scalar type BFloat16 but
    found Float". Output in the input's dtype, equal to a float64 reference on the same (rounded) input up to the
    output's rounding; running statistics (fp32) updated as by a float64 layer."""
    norm = NORMS[name]()
    assert isinstance(norm, NORM_LAYERS)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 5, 4, 6, 6).to(dtype)  # 2 tasks of 5 samples [4, 6, 6]
    if name == "batchnorm1d":
        x = x[..., 0]  # [2, 5, 4, 6]: BatchNorm1d on [N, C, L]
    params = {n: torch.stack([p.detach(), 2 * p.detach()]) for n, p in norm.named_parameters()}
    buffers = {n: torch.stack([b, b]) if b.is_floating_point() else b for n, b in norm.named_buffers()}

    def layer(p, b, x_task):
        return functional_call(norm, {**p, **b}, (x_task,))

    in_dims = (0, {n: 0 if b.is_floating_point() else None for n, b in buffers.items()}, 0)
    with wrapped_forwards([norm], lambda m, f: functools.partial(norm_in_dtype, torch.float32, f)), \
            torch.autocast("cpu", dtype=dtype):
        y = vmap(layer, in_dims=in_dims)(params, buffers, x)
    assert y.dtype == dtype
    for task in range(2):
        state = {n: t[task].double() for n, t in params.items()}
        ref_buffers = {n: b.double() if b.is_floating_point() else b.clone() for n, b in norm.named_buffers()}
        ref = functional_call(norm, {**state, **ref_buffers}, (x[task].double(),))
        torch.testing.assert_close(y[task].double(), ref, rtol=UNIT_ROUNDOFF[dtype], atol=UNIT_ROUNDOFF[dtype])
        for n, b in ref_buffers.items():
            if b.is_floating_point():
                torch.testing.assert_close(buffers[n][task].double(), b, rtol=1e-5, atol=1e-6)


class _Probe(nn.Module):
    """A linear encoder that records, on every call, whether autocast is on and the dtype its Linear computes in."""

    def __init__(self, log: list):
        super().__init__()
        self.linear, self.log = nn.Linear(64, 8), log

    def forward(self, x):
        z = self.linear(x.flatten(1))
        self.log.append(("network", torch.is_autocast_enabled("cpu"), z.dtype))
        return z


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_autocast_covers_the_networks_not_the_loss(batching):
    """The model and BYOL's momentum copy of it run under autocast (bf16 matmuls); the predictor, the loss and the
    head get fp32 embeddings with autocast off, and every pass of the step is one of the two."""
    log = []
    objective = losses.BYOL(embed_dim=8, hidden_dim=16)
    predictor_forward = objective.predictor.forward

    def predictor(z):
        log.append(("predictor", torch.is_autocast_enabled("cpu"), z.dtype))
        return predictor_forward(z)

    objective.predictor.forward = predictor
    step = GeSSLStep(_Probe(log), objective, hypergrad="hvp", autocast_dtype=torch.bfloat16, task_batching=batching,
                     **STEP)
    views = torch.randn(2, 2, 3, 1, 8, 8)
    assert not step(views).skipped
    log.clear()  # the first step also checks the model once, in a plain fp32 pass without autocast
    assert not step(views).skipped
    networks = [entry for entry in log if entry[0] == "network"]
    predictors = [entry for entry in log if entry[0] == "predictor"]
    assert networks and predictors and len(networks) + len(predictors) == len(log)
    assert all(entry[1:] == (True, torch.bfloat16) for entry in networks), set(networks)
    assert all(entry[1:] == (False, torch.float32) for entry in predictors), set(predictors)


class _Attention(nn.Module):
    """LayerNorm → self-attention (4 tokens of width 8) → mean → Linear: inputs [B, 1, 4, 8]."""

    def __init__(self):
        super().__init__()
        self.norm, self.out = nn.LayerNorm(8), nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.norm(x.squeeze(1))
        return self.out(self.attention(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("method", ["hvp", "itd"])
def test_attention_under_autocast(method):
    """Attention under vmap mixed fp32 and bf16 operands and its double derivative failed ("expected scalar type
    BFloat16 but found Float"). Second-order methods, both batchings, both dtypes: within the exact methods' bound
    of fp32 (measured over seeds 0–4: at most 28 u)."""
    model, views = _Attention(), torch.randn(NUM_TASKS, 2, PAIRS, 1, 4, 8)
    reference = hypergradient(model, views, method, None, "loop")
    for dtype, unit in UNIT_ROUNDOFF.items():
        for batching in ("loop", "vmap"):
            distance = relative_distance(hypergradient(model, views, method, dtype, batching), reference)
            assert distance < DEFAULT_BOUND_IN_U * unit, f"{dtype} {batching}: {distance:.3g} from fp32"
