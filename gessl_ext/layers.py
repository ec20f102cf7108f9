"""How GeSSL runs the layers that torch cannot batch over tasks, differentiate twice, replay, or mix precisions in.

Each function here is a substitute ``forward(module, *args)`` with the layer's own function, entered for the
duration of a pass by :class:`gessl_ext.tasks.TaskModel` (docs/models.md lists what runs this way and why):

* normalisation layers — BatchNorm / InstanceNorm as :func:`gessl_ext.batch_norm.normalize` where the fused kernels'
  double backward does not batch (:func:`_reversible_norm`), from elementary ops where InstanceNorm would update its
  statistics in every pass (:func:`_plain_norm`); every norm layer in the parameters' dtype under autocast
  (:func:`norm_in_dtype`);
* recurrent layers with a batched initial state and cuDNN off (:func:`recurrent_forward`);
* RReLU, torchvision's StochasticDepth (draws vmap can batch) and Hardsigmoid (twice differentiable);
* Linear / convolution / attention run in the autocast dtype themselves (:func:`layer_in_low_precision`).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Callable

import torch
from torch import nn

from .batch_norm import affine_normalize, normalize

Tensor = torch.Tensor


def tracked_norms(module: nn.Module) -> dict[str, nn.modules.batchnorm._NormBase]:
    """BatchNorm and InstanceNorm layers that keep running statistics, by name."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None}


@contextlib.contextmanager
def running_stats_frozen(norms):
    """Temporarily switch running-statistics tracking of the given norm layers off (they normalise as before)."""
    saved = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, s in zip(norms, saved):
            m.track_running_stats = s


def _uses_input_stats(norm: nn.modules.batchnorm._NormBase) -> bool:
    """True when the layer normalises with statistics of its input (training mode, or no running statistics)."""
    return norm.training or norm.running_mean is None


def _plain_norm(norm: nn.modules.batchnorm._NormBase, x: Tensor) -> Tensor:
    """BatchNorm (statistics over the batch and spatial axes) or InstanceNorm (per sample, over the spatial
    axes) from elementary ops, with torch's semantics; x: [B, C, *spatial] (InstanceNorm also [C, *spatial]).

    Input statistics when :func:`_uses_input_stats`, else the running statistics, which it leaves alone: every
    pass runs with tracking off, and the task's first pass records the statistics to fold in
    (:func:`recording_statistics`, :class:`gessl_ext.tasks.TaskModel`). Used for InstanceNorm with running
    statistics, whose fused kernel updates them in every pass (and, under vmap, in place into unbatched buffers).
    Computed as :func:`gessl_ext.batch_norm.affine_normalize`.
    """
    x, dims, unbatched = _norm_axes(norm, x)
    if _uses_input_stats(norm):
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    else:
        mean, var = (stat.view(_channel_shape(x)) for stat in (norm.running_mean, norm.running_var))
    y = affine_normalize(x, mean, torch.rsqrt(var + norm.eps), *_affine_params(norm, x))
    return y.squeeze(0) if unbatched else y


def _reversible_norm(norm: nn.modules.batchnorm._NormBase, x: Tensor) -> Tensor:
    """A BatchNorm / InstanceNorm layer that normalises with input statistics, as
    :func:`gessl_ext.batch_norm.normalize`: differentiable twice in reverse mode under vmap (``itd``), where torch's
    fused double backward has no batching rule, keeping less for it than :func:`_plain_norm` would. Running
    statistics are left alone, as in :func:`_plain_norm`."""
    x, dims, unbatched = _norm_axes(norm, x)
    y = normalize(x, *_affine_params(norm, x), norm.eps, dims)
    return y.squeeze(0) if unbatched else y


def _channel_shape(x: Tensor) -> list[int]:
    """[1, C, 1, …]: a per-channel vector's shape against x [B, C, *spatial]."""
    return [1, -1] + [1] * (x.dim() - 2)


def _affine_params(norm: nn.modules.batchnorm._NormBase, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The layer's (weight, bias) shaped per channel against x [B, C, *spatial], or (None, None) without them."""
    shape = _channel_shape(x)
    return (norm.weight.view(shape), norm.bias.view(shape)) if norm.affine else (None, None)


def _norm_axes(norm: nn.modules.batchnorm._NormBase, x: Tensor):
    """(x with a batch axis, the axes its statistics reduce, whether x had no batch axis)."""
    instance = isinstance(norm, nn.modules.instancenorm._InstanceNorm)
    unbatched = instance and x.dim() == norm._get_no_batch_dim()
    if unbatched:
        x = x.unsqueeze(0)
    return x, list(range(2, x.dim())) if instance else [0] + list(range(2, x.dim())), unbatched


def batch_statistics(norm: nn.modules.batchnorm._NormBase, x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean [C], unbiased variance [C]) that a training-mode pass of ``norm`` on input x folds into its running
    statistics (:func:`update_running_stats`), detached, in the running statistics' dtype: BatchNorm's over the
    batch and spatial axes, InstanceNorm's per instance and averaged over the batch."""
    instance = isinstance(norm, nn.modules.instancenorm._InstanceNorm)
    x, dims, _ = _norm_axes(norm, x.detach().to(norm.running_mean.dtype))
    count = x[0, 0].numel() if instance else x.numel() // x.shape[1]
    var, mean = torch.var_mean(x, dims, correction=0)
    if instance:   # [B, C], one per instance
        mean, var = mean.mean(0), var.mean(0)
    return mean, var * count / max(count - 1, 1)


@torch.no_grad()
def update_running_stats(norm: nn.modules.batchnorm._NormBase, mean: Tensor, var: Tensor, buffers) -> None:
    """Fold one batch's (mean [C], unbiased variance [C]) into running statistics ``buffers`` (running_mean,
    running_var, num_batches_tracked; e.g. per-task copies) in place, as torch's layer does: the counter + 1; factor
    ``momentum``, or with momentum None 1 / counter for BatchNorm (a cumulative average) and 0 for InstanceNorm."""
    running_mean, running_var, counter = buffers
    counter.add_(1)
    if norm.momentum is not None:
        factor = norm.momentum
    else:
        factor = 0.0 if isinstance(norm, nn.modules.instancenorm._InstanceNorm) else 1 / counter.to(running_mean.dtype)
    running_mean.mul_(1 - factor).add_(factor * mean)
    running_var.mul_(1 - factor).add_(factor * var)


def recording_statistics(norms: dict[str, nn.modules.batchnorm._NormBase], records: list):
    """Context: each training-mode call of a layer of ``norms`` (name → layer) appends (name, mean [C], variance [C])
    of its input (:func:`batch_statistics`) to ``records``, in call order, and runs as before. Enter it after the
    substitutes (:func:`wrapped_forwards`)."""
    names = {id(m): name for name, m in norms.items()}

    def wrap(m, forward):
        def recorded(x, *args, **kwargs):
            if m.training:
                records.append((names[id(m)], *batch_statistics(m, x)))
            return forward(x, *args, **kwargs)
        return recorded

    return wrapped_forwards(list(norms.values()), wrap)


@contextlib.contextmanager
def substituted_norms(norms, reversed_twice: bool):
    """Context: with ``reversed_twice`` (passes differentiated twice in reverse mode under vmap), every BatchNorm /
    InstanceNorm layer that normalises with input statistics runs as :func:`_reversible_norm`; InstanceNorm layers
    with running statistics otherwise run as :func:`_plain_norm`."""
    reversible = [m for m in norms if reversed_twice and _uses_input_stats(m)]
    plain = [m for m in norms if m not in reversible
             and isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.running_mean is not None]
    with substituted(reversible, _reversible_norm), substituted(plain, _plain_norm):
        yield


def recurrent_forward(rnn: nn.Module, input, hx=None):
    """``rnn(input, hx)`` of an ``nn.RNN`` / ``GRU`` / ``LSTM`` or their cells as GeSSL runs it: with cuDNN off
    (cuDNN's RNN kernels have no double backward, which ``hvp``/``itd`` take) and with the initial state derived
    from the input, so that under vmap it is batched like the input (torch's own zero state is an unbatched
    tensor, which the RNN cell's in-place gate update cannot take: "output with shape [4, 12] doesn't match the
    broadcast shape [1, 4, 12]"). A given state gets a batched zero added for the same reason. vmap has no
    batching rule for the fused RNN ops; under a gradient transform they decompose into batchable cell ops,
    so a pass without gradients (the target's embeddings) takes the forward of a ``torch.func.vjp``."""
    packed = isinstance(input, nn.utils.rnn.PackedSequence)
    if not packed:
        if hx is None:
            lstm = isinstance(rnn, (nn.LSTM, nn.LSTMCell))
            if isinstance(rnn, nn.RNNBase):
                layers = (rnn.num_layers * (2 if rnn.bidirectional else 1),)
                batch = () if input.dim() == 2 else (input.shape[0 if rnn.batch_first else 1],)
                out_size = rnn.proj_size or rnn.hidden_size
            else:
                layers, batch, out_size = (), input.shape[:-1], rnn.hidden_size
            h = input.new_zeros(*layers, *batch, out_size)
            hx = (h, input.new_zeros(*layers, *batch, rnn.hidden_size)) if lstm else h
        else:
            zero = input.new_zeros(())
            hx = tuple(h + zero for h in hx) if isinstance(hx, tuple) else hx + zero

    def forward(x):
        with torch.backends.cudnn.flags(enabled=False):
            return type(rnn).forward(rnn, x, hx)

    return forward(input) if packed or torch.is_grad_enabled() else torch.func.vjp(forward, input)[0]


@contextlib.contextmanager
def substituted(modules, forward: Callable):
    """Temporarily run each of ``modules`` as ``forward(module, *args)`` (:func:`wrapped_forwards`, ignoring the
    forward it had)."""
    with wrapped_forwards(modules, lambda m, _: functools.partial(forward, m)):
        yield


def _rrelu(rrelu: nn.RReLU, x: Tensor) -> Tensor:
    """``nn.RReLU``: in training, slope a ~ U(lower, upper) per element on x < 0, drawn with ``rand_like`` (torch's
    fused kernel has no vmap rule); in eval, the fixed slope (lower + upper) / 2."""
    if not rrelu.training:
        return nn.functional.rrelu(x, rrelu.lower, rrelu.upper, training=False)
    return torch.where(x >= 0, x, x * (rrelu.lower + (rrelu.upper - rrelu.lower) * torch.rand_like(x)))


def _stochastic_depth(layer: nn.Module, x: Tensor) -> Tensor:
    """torchvision's ``StochasticDepth`` (p, mode "row" | "batch") with its noise drawn from a tensor made from the
    input (torchvision draws in place into a fresh ``torch.empty``, which vmap cannot give each task)."""
    if not layer.training or layer.p == 0.0:
        return x
    survival = 1.0 - layer.p
    size = [x.shape[0]] + [1] * (x.dim() - 1) if layer.mode == "row" else [1] * x.dim()
    noise = x.new_empty(size).bernoulli_(survival)
    return x * (noise / survival if survival > 0.0 else noise)


def _hardsigmoid(layer: nn.Hardsigmoid, x: Tensor) -> Tensor:
    """``nn.Hardsigmoid`` as relu6(x + 3) / 6: the same function, but twice differentiable in torch (its fused
    kernel's backward has neither a derivative nor a forward-mode rule, which ``hvp``/``itd`` need)."""
    return nn.functional.relu6(x + 3.0) / 6.0


def layer_substitutes(module: nn.Module) -> list[tuple[list[nn.Module], Callable]]:
    """The model's layers that run as a substitute in every GeSSL pass, (layers, forward): RReLU and torchvision's
    StochasticDepth (random draws vmap can batch), Hardsigmoid (twice differentiable)."""
    kinds: list[tuple[type, Callable]] = [(nn.RReLU, _rrelu), (nn.Hardsigmoid, _hardsigmoid)]
    torchvision_ops = sys.modules.get("torchvision.ops.stochastic_depth")  # loaded if the model uses it
    if torchvision_ops is not None:
        kinds.append((torchvision_ops.StochasticDepth, _stochastic_depth))
    found = [([m for m in module.modules() if type(m) is kind], forward) for kind, forward in kinds]
    return [(layers, forward) for layers, forward in found if layers]


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
"""Normalisation layers, which GeSSL runs in the parameters' dtype under autocast (:func:`norm_in_dtype`;
``_NormBase`` covers BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm1d/2d/3d)."""


def norm_in_dtype(dtype: torch.dtype, forward: Callable, x: Tensor, *args, **kwargs) -> Tensor:
    """A normalisation layer's ``forward(x)`` computed in ``dtype`` (the parameters'), autocast off, and returned
    in x's (low-precision) dtype: the arithmetic of torch's mixed-precision BatchNorm kernels.

    Autocast leaves normalisation layers alone, so their low-precision input meets fp32 weights, biases and
    running statistics. A plain call accepts that mix, ``vmap`` does not: its BatchNorm batching rule normalises
    with a stand-in weight of the input's dtype next to the fp32 running statistics ("expected scalar type
    BFloat16 but found Float"), and without running statistics hands back fp32, which cuDNN's BatchNorm backward
    then rejects (most likely the GPU's "Expected grad_output to have type BFloat16 but got Float"). Up-casting
    the input keeps every norm path, fused or substituted (:func:`_plain_norm`), in one dtype.
    """
    with torch.autocast(x.device.type, enabled=False):
        return forward(x.to(dtype), *args, **kwargs).to(x.dtype)


LOWERED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.MultiheadAttention)
"""Layers (these exact types; a subclass may compute differently) that GeSSL runs in the autocast dtype itself."""


def layer_in_low_precision(autocast_dtype: torch.dtype, layer: nn.Module, forward: Callable, *args, **kwargs):
    """A layer's ``forward`` entirely in ``autocast_dtype``: its floating inputs and the parameters of it and its
    submodules (attention's output projection) cast, autocast off inside. Done explicitly because under ``vmap``
    autocast reaches these ops only in part (torch 2.14, CPU: convolutions ran in fp32; a Linear's bias was added
    in fp32, giving an fp32 output, pytorch/pytorch#192617; attention mixed fp32 and bf16 operands and its double
    derivative failed), so that loop and vmap compute alike. Attention's softmax then runs in the low dtype too.
    The parameters are swapped the way ``functional_call`` swaps them, so gradients reach the originals."""
    saved = [(m, dict(m._parameters)) for m in layer.modules()]
    device = next(p for _, params in saved for p in params.values() if p is not None).device.type
    args, kwargs = torch.utils._pytree.tree_map_only(
        Tensor, lambda t: t.to(autocast_dtype) if t.is_floating_point() else t, (args, kwargs))
    for m, params in saved:
        m._parameters.update({n: p.to(autocast_dtype) for n, p in params.items()
                              if p is not None and p.is_floating_point()})
    try:
        with torch.autocast(device, enabled=False):
            return forward(*args, **kwargs)
    finally:
        for m, params in saved:
            m._parameters.update(params)


def network_under_autocast(autocast_dtype: torch.dtype, dtype: torch.dtype, forward: Callable, x: Tensor,
                            *args, **kwargs):
    """A network's ``forward(x)`` under autocast to ``autocast_dtype``, its floating outputs up-cast to ``dtype``
    (the parameters'), so that everything computed from them (SSL loss, head, KL) runs in ``dtype``."""
    with torch.autocast(x.device.type, dtype=autocast_dtype):
        out = forward(x, *args, **kwargs)
    return torch.utils._pytree.tree_map_only(Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, out)


@contextlib.contextmanager
def wrapped_forwards(modules, wrap: Callable[[nn.Module, Callable], Callable]):
    """Temporarily run each module m as ``wrap(m, f)``, f being the forward it has on entry (its own or a substitute
    such as :func:`_plain_norm`; enter this after the substitutes); restores f on exit."""
    saved = [(m, vars(m).get("forward")) for m in modules]
    for m, _ in saved:
        m.forward = wrap(m, m.forward)
    try:
        yield
    finally:
        for m, previous in saved:
            if previous is None:
                del m.forward
            else:
                m.forward = previous
