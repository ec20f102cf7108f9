"""Backbones and projectors for the main job.

``build_model(backbone, in_channels, image_size, proj_dim=128)`` returns an :class:`SSLNet` mapping images
[B, C, H, W] to embeddings [B, proj_dim]; ``.backbone`` gives the features [B, feature_dim] used for
evaluation, ``.projector`` maps them to the embedding the SSL objective and the GeSSL head see.

Backbones:
* ``convnet`` — exactly conv3×3(C→32) + ReLU → conv3×3(32→64) + ReLU → 2×2 max-pool → flatten →
  linear(→128), unpadded convolutions (the classic PyTorch MNIST network and the benchmark model of the
  CPU performance suite). Its default projector is the identity, so ``build_model("convnet", 1, 28)`` is
  that network and nothing more.
* ``convnet_bn`` — the same with BatchNorm after each convolution.
* ``conv4`` — the "C4" backbone of the few-shot literature: 4 × (conv3×3 64 + BatchNorm + ReLU + 2×2 max-pool).
* ``resnet18`` — CIFAR-style ResNet-18: 3×3 stride-1 stem, no max-pool, BatchNorm, global average pool (512).
* ``resnet50`` — torchvision's ResNet-50 with the same small-input stem (2048).

Projectors (``projector=``): ``"mlp"`` linear(d→d) + ReLU + linear(d→proj_dim) (SimCLR's), ``"linear"``,
``"none"`` (identity; needs proj_dim == feature_dim) or ``"auto"`` (``none`` for the convnets, ``mlp``
for the others).
"""
from __future__ import annotations

import torch
from torch import nn

BACKBONES = ("convnet", "convnet_bn", "conv4", "resnet18", "resnet50")
PROJECTORS = ("auto", "mlp", "linear", "none")


class SSLNet(nn.Module):
    """backbone [B, C, H, W] -> [B, feature_dim], then projector -> [B, proj_dim]."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def _convnet(in_channels: int, image_size: int, batchnorm: bool) -> tuple[nn.Module, int]:
    side = (image_size - 4) // 2
    if side < 1:
        raise ValueError(f"backbone convnet needs image_size >= 6, got {image_size}")

    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.ReLU()]

    net = nn.Sequential(*block(in_channels, 32), *block(32, 64), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64 * side * side, 128))
    return net, 128


def _conv4(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    if image_size < 16:
        raise ValueError(f"backbone conv4 needs image_size >= 16 (four 2x2 poolings), got {image_size}")
    layers, cin = [], in_channels
    for _ in range(4):
        layers += [nn.Conv2d(cin, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]
        cin = 64
    side = image_size // 16
    return nn.Sequential(*layers, nn.Flatten()), 64 * side * side


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv + BatchNorm, identity or 1×1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet18(in_channels: int, width: int = 64) -> tuple[nn.Module, int]:
    layers = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, blocks in enumerate((2, 2, 2, 2)):
        cout = width * 2 ** i
        for j in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), cin


def _resnet50(in_channels: int) -> tuple[nn.Module, int]:
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 2048


def build_model(backbone: str, in_channels: int, image_size: int, proj_dim: int = 128,
                projector: str = "auto") -> SSLNet:
    """An :class:`SSLNet` for images [B, in_channels, image_size, image_size] -> [B, proj_dim]."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if projector not in PROJECTORS:
        raise ValueError(f"unknown projector {projector!r}; choose one of {', '.join(PROJECTORS)}")
    for name, value in (("in_channels", in_channels), ("image_size", image_size), ("proj_dim", proj_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if backbone in ("resnet18", "resnet50") and image_size < 8:
        raise ValueError(f"backbone {backbone} needs image_size >= 8, got {image_size}")

    if backbone in ("convnet", "convnet_bn"):
        net, feature_dim = _convnet(in_channels, image_size, batchnorm=backbone == "convnet_bn")
    elif backbone == "conv4":
        net, feature_dim = _conv4(in_channels, image_size)
    elif backbone == "resnet18":
        net, feature_dim = _resnet18(in_channels)
    else:
        net, feature_dim = _resnet50(in_channels)

    if projector == "auto":
        projector = "none" if backbone in ("convnet", "convnet_bn") else "mlp"
    if projector == "none":
        if proj_dim != feature_dim:
            raise ValueError(f"projector 'none' keeps the {backbone} features ({feature_dim}-d), "
                             f"but proj_dim is {proj_dim}; use projector 'linear' or 'mlp'")
        head = nn.Identity()
    elif projector == "linear":
        head = nn.Linear(feature_dim, proj_dim)
    else:
        head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, proj_dim))
    return SSLNet(net, head, feature_dim)
