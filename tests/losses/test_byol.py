import math

import pytest
import torch

from gessl_ext.losses import BYOL
from gessl_ext.losses.byol import _normalised_mse
from loss_test_utils import cosine, reference_prediction_mlp, tiny_model


def test_normalised_mse_closed_form():
    # rows: orthogonal -> 2, parallel -> 0, opposite -> 4, 60 degrees -> 2 - 2 * 1/2 = 1; mean = 7/4
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    assert _normalised_mse(p, t).item() == pytest.approx(7 / 4, rel=1e-12)


def make_bound_byol(momentum=0.7):
    model = tiny_model()
    torch.manual_seed(1)
    objective = BYOL(embed_dim=3, hidden_dim=5, momentum=momentum).double()
    objective.bind(model)
    initial_target = {k: v.clone() for k, v in objective.momentum_network.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    objective.before_step(model)
    return model, objective, initial_target


def test_value_matches_reference_with_ema_target():
    model, objective, initial_target = make_bound_byol(momentum=0.7)
    x1, x2 = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).unbind()
    loss = objective(model, x1, x2)

    target_net = tiny_model(seed=9)
    expected_state = {name: 0.7 * initial_target[name] + 0.3 * p.detach() for name, p in model.named_parameters()}
    expected_state.update({name: b.clone() for name, b in model.named_buffers()})
    target_net.load_state_dict(expected_state)
    x = torch.cat([x1, x2])
    t1, t2 = target_net(x).detach().chunk(2)
    p1, p2 = reference_prediction_mlp(objective.predictor, model(x)).chunk(2)
    expected = sum(2 - 2 * cosine(p1[i], t2[i]) for i in range(5)) / 5 + sum(2 - 2 * cosine(p2[i], t1[i]) for i in range(5)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_state_dict_round_trip_restores_target_and_predictor():
    _, objective, _ = make_bound_byol()
    state = objective.state_dict()
    assert any(k.startswith("momentum_network.") for k in state) and any(k.startswith("predictor.") for k in state)
    restored = BYOL(embed_dim=3, hidden_dim=5).double()
    with pytest.raises(RuntimeError, match="momentum_network"):
        restored.load_state_dict(state)  # unbound: GeSSLStep must be constructed (bind) before load_state_dict
    restored.bind(tiny_model(seed=5))
    restored.load_state_dict(state)
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert not any(p.requires_grad for p in restored.momentum_network.parameters())
