"""Backbones and projectors of the main job."""
import pytest
import torch
from torch import nn

from gessl_ext.train.models import build_model


def test_convnet_is_exactly_the_benchmark_network():
    torch.manual_seed(0)
    model = build_model("convnet", 1, 28)
    layers = list(model.backbone)
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear]
    assert (layers[0].in_channels, layers[0].out_channels, layers[0].kernel_size) == (1, 32, (3, 3))
    assert (layers[2].in_channels, layers[2].out_channels, layers[2].kernel_size) == (32, 64, (3, 3))
    assert layers[4].kernel_size == 2 and layers[6].out_features == 128
    assert isinstance(model.projector, nn.Identity)
    # 1x28x28 -> 26 -> 24 -> pool 12: 64*12*12 = 9216 inputs to the linear layer
    assert sum(p.numel() for p in model.parameters()) == (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9216 * 128 + 128)
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    model = model.double()
    # functional reference of the same network
    import torch.nn.functional as F
    h = F.relu(F.conv2d(x, layers[0].weight, layers[0].bias))
    h = F.relu(F.conv2d(h, layers[2].weight, layers[2].bias))
    ref = F.linear(F.max_pool2d(h, 2).flatten(1), layers[6].weight, layers[6].bias)
    torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("backbone,channels,size,feature_dim", [
    ("convnet", 3, 12, 128), ("convnet_bn", 1, 28, 128), ("conv4", 3, 32, 256), ("resnet18", 3, 16, 512),
    ("resnet50", 1, 8, 2048),
])
def test_backbones_map_images_to_embeddings(backbone, channels, size, feature_dim):
    model = build_model(backbone, channels, size, proj_dim=32, projector="mlp")
    x = torch.randn(4, channels, size, size)
    assert model.backbone(x).shape == (4, feature_dim) and model.feature_dim == feature_dim
    assert model(x).shape == (4, 32)
    torch.testing.assert_close(model(x), model.projector(model.backbone(x)))


def test_resnet18_is_cifar_style():
    model = build_model("resnet18", 3, 32)
    stem = model.backbone[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20   # 1 stem + 8 blocks * 2 + 3 shortcuts
    assert isinstance(model.projector, nn.Sequential)       # auto -> mlp


def test_projector_choices_and_errors():
    assert isinstance(build_model("convnet", 1, 28, 64, projector="linear").projector, nn.Linear)
    with pytest.raises(ValueError, match="unknown backbone 'vit'"):
        build_model("vit", 3, 32)
    with pytest.raises(ValueError, match="unknown projector"):
        build_model("convnet", 1, 28, projector="big")
    with pytest.raises(ValueError, match="image_size >= 6"):
        build_model("convnet", 1, 5)
    with pytest.raises(ValueError, match="image_size >= 16"):
        build_model("conv4", 1, 12)
    with pytest.raises(ValueError, match="proj_dim is 64"):
        build_model("convnet", 1, 28, proj_dim=64, projector="none")
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        build_model("convnet", 0, 28)
