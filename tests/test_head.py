"""The pair-classification head π and the outer KL (Eq. 3) against plain formulas on fresh random inputs."""
import pytest
import torch
import torch.nn.functional as F

from gessl_ext.head import PairHead, kl_from_log_probs, outer_kl, pair_logits


def embeddings(n=5, d=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=generator, dtype=torch.float64) for _ in range(4)]


def test_pair_logits_are_cosine_similarities_over_tau_in_both_directions():
    z1, z2, _, _ = embeddings()
    logits = pair_logits(z1, z2, 0.2)
    cos = F.cosine_similarity(z1[:, None, :], z2[None, :, :], dim=-1)
    assert logits.shape == (10, 5)
    assert torch.allclose(logits[:5], cos / 0.2, rtol=0, atol=1e-13)
    assert torch.allclose(logits[5:], cos.T / 0.2, rtol=0, atol=1e-13)


def test_pair_head_gives_normalised_log_probabilities():
    z1, z2, _, _ = embeddings(seed=1)
    log_probs = PairHead(0.1)(z1, z2)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(10, dtype=torch.float64), atol=1e-13)
    assert torch.allclose(log_probs, F.log_softmax(pair_logits(z1, z2, 0.1), -1), atol=1e-13)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_pair_head_rejects_a_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be positive"):
        PairHead(temperature)


def test_kl_is_torch_kl_div_batchmean_and_zero_for_equal_distributions():
    generator = torch.Generator().manual_seed(2)
    target = F.log_softmax(torch.randn(6, 4, generator=generator, dtype=torch.float64), -1)
    current = F.log_softmax(torch.randn(6, 4, generator=generator, dtype=torch.float64), -1)
    expected = F.kl_div(current, target, reduction="batchmean", log_target=True)
    assert abs(float(kl_from_log_probs(target, current) - expected)) < 1e-14
    assert float(kl_from_log_probs(target, target)) == 0.0


@pytest.mark.parametrize("use_kernels", [False, True])
def test_outer_kl_equals_kl_of_the_head_on_target_and_current(use_kernels):
    """With use_kernels on a CPU tensor the fused op does not apply and the plain path runs: same value."""
    z1, z2, t1, t2 = embeddings(seed=3)
    head = PairHead(0.5)
    expected = F.kl_div(head(z1, z2), head(t1, t2), reduction="batchmean", log_target=True)
    assert abs(float(outer_kl(head, z1, z2, t1, t2, use_kernels=use_kernels) - expected)) < 1e-14
