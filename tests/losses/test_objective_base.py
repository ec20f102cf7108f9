import pytest
import torch
from torch import nn

from gessl_ext.losses import PairObjective, SimCLR, SSLObjective, as_objective


class RecordingEmbed:
    """An embed callable that records the batch shapes it was called with."""

    def __init__(self, weight):
        self.weight = weight
        self.calls = []

    def __call__(self, x):
        self.calls.append(tuple(x.shape))
        return x @ self.weight


class DifferenceObjective(PairObjective):
    def pair_loss(self, z1, z2):
        return ((z1 - z2) ** 2).sum() + 10 * z1[0, 0]


def test_pair_objective_embeds_both_views_in_one_call():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, dtype=torch.float64)
    x1, x2 = torch.randn(2, 5, 4, dtype=torch.float64).unbind()
    embed = RecordingEmbed(weight)
    loss = DifferenceObjective()(embed, x1, x2)
    assert embed.calls == [(10, 4)]
    z1, z2 = x1 @ weight, x2 @ weight
    expected = ((z1 - z2) ** 2).sum() + 10 * z1[0, 0]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


class RecordingPairObjective(PairObjective):
    def __init__(self):
        super().__init__()
        self.seen = []

    def pair_loss(self, z1, z2):
        self.seen.append((z1, z2))
        return z1.sum()


def test_pair_objective_sees_whole_task_batch_statistics():
    """BatchNorm in the model normalises over the 2N images of both views, not per view."""
    torch.manual_seed(1)
    norm = nn.BatchNorm1d(3, affine=False).double()
    x1, x2 = torch.randn(2, 4, 3, dtype=torch.float64).unbind()
    x2 = x2 + 5.0  # per-view normalisation would hide this shift
    objective = RecordingPairObjective()
    objective(norm, x1, x2)
    (z1, z2), = objective.seen
    both = torch.cat([x1, x2])
    standardised = (both - both.mean(0)) / torch.sqrt(both.var(0, unbiased=False) + norm.eps)
    torch.testing.assert_close(z1, standardised[:4], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z2, standardised[4:], rtol=1e-10, atol=1e-10)


def test_base_methods_must_be_implemented():
    with pytest.raises(NotImplementedError, match="forward"):
        SSLObjective()(lambda x: x, torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(NotImplementedError, match="pair_loss"):
        PairObjective()(lambda x: x, torch.zeros(2, 1), torch.zeros(2, 1))


def test_as_objective_passes_objectives_through():
    objective = SimCLR()
    assert as_objective(objective) is objective


def test_as_objective_wraps_plain_callable():
    torch.manual_seed(2)
    z1, z2 = torch.randn(2, 5, 3, dtype=torch.float64).unbind()

    def mean_squared_distance(a, b):
        return ((a - b) ** 2).mean()

    objective = as_objective(mean_squared_distance)
    assert isinstance(objective, PairObjective)
    torch.testing.assert_close(objective.pair_loss(z1, z2), ((z1 - z2) ** 2).mean(), rtol=1e-12, atol=0)
    weight = torch.randn(3, 3, dtype=torch.float64)
    expected = ((z1 @ weight - z2 @ weight) ** 2).mean()
    torch.testing.assert_close(objective(lambda x: x @ weight, z1, z2), expected, rtol=1e-12, atol=0)


def test_as_objective_registers_module_loss_parameters():
    class ScaledDistance(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, a, b):
            return self.scale * (a - b).abs().sum()

    loss = ScaledDistance()
    objective = as_objective(loss)
    assert [p for p in objective.parameters()] == [loss.scale]
    assert list(objective.state_dict()) == ["loss_fn.scale"]
    value = objective.pair_loss(torch.ones(2, 2), torch.zeros(2, 2))
    assert value.item() == 8.0


def test_as_objective_rejects_bad_input():
    with pytest.raises(TypeError, match="int"):
        as_objective(3)
    with pytest.raises(TypeError, match="SimCLR"):
        as_objective(SimCLR)
    with pytest.raises(TypeError, match="str"):
        as_objective("simclr")


def test_wrapped_callable_must_return_scalar():
    objective = as_objective(lambda a, b: a - b)
    with pytest.raises(ValueError, match=r"0-dim tensor, got \(2, 2\)"):
        objective.pair_loss(torch.ones(2, 2), torch.zeros(2, 2))
