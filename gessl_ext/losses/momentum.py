"""Momentum (EMA) copies of the online model, shared by BYOL and MoCo."""
import copy

import torch
from torch import Tensor, nn

from ._checks import check_unit_interval
from .base import SSLObjective


def momentum_copy(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` with ``requires_grad=False`` and no ``.grad`` (GeSSLStep treats it as a constant)."""
    target = copy.deepcopy(model)
    for param in target.parameters():
        param.grad = None
    return target.requires_grad_(False)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: every parameter ``t <- momentum * t + (1 - momentum) * o``; every buffer is copied
    (BatchNorm running statistics, counters), since GeSSLStep never updates the target's own buffers."""
    target_params, online_params = dict(target.named_parameters()), dict(online.named_parameters())
    target_buffers, online_buffers = dict(target.named_buffers()), dict(online.named_buffers())
    if target_params.keys() != online_params.keys() or target_buffers.keys() != online_buffers.keys():
        raise ValueError("the momentum network does not match the model's parameters/buffers; was bind() called with this model?")
    for name, online_param in online_params.items():
        target_params[name].mul_(momentum).add_(online_param.detach(), alpha=1.0 - momentum)
    for name, online_buffer in online_buffers.items():
        target_buffers[name].copy_(online_buffer)


class MomentumObjective(SSLObjective):
    """An objective with a momentum network (BYOL's target network, MoCo's key encoder).

    ``bind(model)`` creates ``self.momentum_network`` (a frozen deep copy of the model, a submodule,
    so it is in ``state_dict``); ``before_step(model)`` applies the EMA with ``self.momentum``.
    The momentum network follows the objective's train/eval mode; in train mode its BatchNorm layers
    normalise with batch statistics (GeSSLStep disables running-stat tracking during its passes).
    Bind before ``load_state_dict`` (construct GeSSLStep first): loading a checkpoint that holds a
    momentum network into an unbound objective raises.
    """

    def __init__(self, momentum: float):
        super().__init__()
        self.momentum = check_unit_interval("momentum", momentum)
        self.register_module("momentum_network", None)

    def bind(self, model):
        self.momentum_network = momentum_copy(model)

    def before_step(self, model):
        ema_update_(self._bound_network(), model, self.momentum)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # An unbound objective would otherwise silently drop the checkpoint's momentum network.
        if self.momentum_network is None and any(key.startswith(prefix + "momentum_network.") for key in state_dict):
            error_msgs.append(
                f"{type(self).__name__} has no momentum_network yet but the state dict holds one: call bind(model) "
                "(construct GeSSLStep) before load_state_dict"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _bound_network(self) -> nn.Module:
        if self.momentum_network is None:
            raise RuntimeError(f"{type(self).__name__} has no momentum network yet: call bind(model) first (GeSSLStep does)")
        return self.momentum_network

    def momentum_embed(self, x: Tensor) -> Tensor:
        """Embeddings [B, d] of x [B, *input_shape] by the momentum network, as constants (no gradient)."""
        network = self._bound_network()
        with torch.no_grad():
            return network(x).detach()
