import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gessl_ext.losses.predictor import BatchStandardisation, prediction_mlp


def test_batch_standardisation_matches_train_mode_batch_norm():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.float64, generator=generator) * 3 + 2
    norm = BatchStandardisation(4, eps=1e-3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0, generator=generator)
        norm.bias.uniform_(-1.0, 1.0, generator=generator)
    expected = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=1e-3)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    # also in eval mode: no running statistics, always the batch
    torch.testing.assert_close(norm.eval()(x), expected, rtol=1e-12, atol=1e-12)


def test_prediction_mlp_layout_and_shape():
    predictor = prediction_mlp(embed_dim=6, hidden_dim=10)
    first, norm, activation, last = predictor
    assert isinstance(first, nn.Linear) and first.bias is None and first.weight.shape == (10, 6)
    assert isinstance(norm, BatchStandardisation) and norm.weight.shape == (10,)
    assert isinstance(activation, nn.ReLU) and last.weight.shape == (6, 10) and last.bias is not None
    assert list(predictor.buffers()) == []
    assert predictor(torch.randn(5, 6)).shape == (5, 6)


@pytest.mark.parametrize("embed_dim, hidden_dim, name", [(0, 4, "embed_dim"), (4, -1, "hidden_dim"), (4, True, "hidden_dim")])
def test_prediction_mlp_rejects_bad_sizes(embed_dim, hidden_dim, name):
    with pytest.raises(ValueError, match=name):
        prediction_mlp(embed_dim, hidden_dim)


def test_an_embedding_size_other_than_the_predictors_is_a_value_error_naming_the_fix():
    with pytest.raises(ValueError, match="4 dimensions but the predictor was built for embed_dim=16: construct the "
                                         "objective with embed_dim=4"):
        prediction_mlp(16, 8)(torch.zeros(3, 4))
