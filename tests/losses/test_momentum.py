import pytest
import torch
from torch import nn

from gessl_ext.losses import BYOL, MoCo
from gessl_ext.losses.momentum import ema_update_, momentum_copy
from loss_test_utils import tiny_model


def perturb_(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + [model[1].running_mean, model[1].running_var]:
            tensor.add_(torch.randn(tensor.shape, dtype=tensor.dtype, generator=generator))
        model[1].num_batches_tracked.fill_(17)


def test_momentum_copy_is_frozen_independent_copy():
    model = tiny_model()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    copy = momentum_copy(model)
    for (name, p), (_, q) in zip(model.named_parameters(), copy.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
        assert not q.requires_grad and q.grad is None
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(copy[1].running_var, model[1].running_var)


@pytest.mark.parametrize("momentum", [0.0, 0.9, 1.0])
def test_ema_update_exact(momentum):
    online = tiny_model()
    target = momentum_copy(online)
    perturb_(online, seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update_(target, online, momentum)
    for name, p in online.named_parameters():
        expected = momentum * before[name] + (1 - momentum) * p.detach()
        torch.testing.assert_close(target.get_parameter(name), expected, rtol=1e-15, atol=1e-15)
    for name, buffer in online.named_buffers():
        assert torch.equal(target.get_buffer(name), buffer), name
    assert target[1].num_batches_tracked.item() == 17


def test_ema_update_rejects_other_architecture():
    with pytest.raises(ValueError, match="bind"):
        ema_update_(momentum_copy(tiny_model()), nn.Linear(2, 2).double(), 0.5)


@pytest.mark.parametrize("make", [lambda: BYOL(3, 5), lambda: MoCo(3, queue_size=4)])
def test_unbound_objective_raises(make):
    objective = make()
    assert objective.momentum_network is None
    with pytest.raises(RuntimeError, match="bind"):
        objective.before_step(tiny_model())
    x = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="bind"):
        objective(tiny_model(), x, x)


@pytest.mark.parametrize("make", [lambda: BYOL(3, 5, momentum=0.8), lambda: MoCo(3, queue_size=4, momentum=0.8)])
def test_before_step_applies_ema_and_no_gradient_reaches_momentum_network(make):
    objective = make().double()
    model = tiny_model()
    objective.bind(model)
    initial = {k: v.clone() for k, v in objective.momentum_network.state_dict().items()}
    perturb_(model, seed=2)
    objective.before_step(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(objective.momentum_network.get_parameter(name), 0.8 * initial[name] + 0.2 * p.detach(),
                                   rtol=1e-15, atol=1e-15)
    x1, x2 = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).unbind()
    objective(model, x1, x2).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() == 2)
    assert all(p.grad is None for p in objective.momentum_network.parameters())


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), None])
def test_rejects_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum"):
        BYOL(3, 5, momentum=momentum)
    with pytest.raises(ValueError, match="momentum"):
        MoCo(3, momentum=momentum)
