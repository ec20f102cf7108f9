import pytest
import torch

from gessl_ext.losses import MaskedReconstruction


def make(seed=0, **kwargs):
    kwargs.setdefault("input_shape", (3, 8, 8))
    kwargs.setdefault("embed_dim", 5)
    return MaskedReconstruction(generator=torch.Generator().manual_seed(seed), **kwargs).double()


def expected_patch_masks(seed, num_patches, num_masked, count):
    """The patch masks the objective should draw: randperm from its generator, first num_masked masked."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(count):
        mask = torch.zeros(num_patches, dtype=torch.bool)
        mask[torch.randperm(num_patches, generator=generator)[:num_masked]] = True
        masks.append(mask)
    return masks


def test_mask_is_patch_structured_and_follows_generator():
    objective = make(seed=3, patch_size=4, mask_ratio=0.75)
    first, second = expected_patch_masks(3, num_patches=4, num_masked=3, count=2)
    for patch_mask in (first, second):
        assert objective.mask.shape == (3, 8, 8)
        for channel in objective.mask:
            assert torch.equal(channel, objective.mask[0])
        for index in range(4):
            row, col = divmod(index, 2)
            block = objective.mask[:, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
            assert block.all() if patch_mask[index] else not block.any()
        assert objective.num_masked_pixels == int(objective.mask.sum()) == 3 * 16 * 3
        objective.after_step(None, torch.zeros(1, 2, 1, 3, 8, 8))


def test_flat_inputs_default_to_per_feature_masks():
    objective = make(seed=5, input_shape=(10,), embed_dim=4, mask_ratio=0.3)
    (expected,) = expected_patch_masks(5, num_patches=10, num_masked=3, count=1)
    assert objective.patch_size == 1 and torch.equal(objective.mask, expected)


@pytest.mark.parametrize("mask_ratio, expected", [(0.25, 3), (0.3, 3), (0.75, 8), (0.5, 5)])
def test_masked_patch_count_rounds_halves_up(mask_ratio, expected):
    objective = make(input_shape=(10,), embed_dim=2, mask_ratio=mask_ratio)
    assert objective.num_masked_patches == expected == int(objective.mask.sum())


def test_hand_computed_loss_and_masked_input():
    # input_shape (4,), features 0 and 2 masked, decoder outputs zeros -> loss = mean over the 2 images of
    # (sum of squared masked features) / 2 = ((1 + 9) + (0 + 4)) / (2 * 2) = 3.5.
    objective = make(input_shape=(4,), embed_dim=2, mask_ratio=0.5)
    objective.mask.copy_(torch.tensor([True, False, True, False]))
    with torch.no_grad():
        objective.decoder.weight.zero_()
        objective.decoder.bias.zero_()
    seen = []

    def embed(x):
        seen.append(x)
        return x[:, :2]

    x1 = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    x2 = torch.tensor([[0.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    assert objective(embed, x1, x2).item() == pytest.approx(3.5, rel=1e-12)
    torch.testing.assert_close(seen[0], torch.tensor([[0.0, 2.0, 0.0, 4.0], [0.0, 1.0, 0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("input_shape, patch_size", [((2, 4, 4), 2), ((6,), 2), ((2, 6), 3)])
def test_matches_loop_reference(input_shape, patch_size):
    torch.manual_seed(1)
    objective = make(seed=2, input_shape=input_shape, embed_dim=3, patch_size=patch_size, mask_ratio=0.5)
    numel = torch.Size(input_shape).numel()
    weight = torch.randn(numel, 3, dtype=torch.float64)
    x1, x2 = torch.randn(2, 3, *input_shape, dtype=torch.float64).unbind()
    loss = objective(lambda x: x.flatten(1) @ weight, x1, x2)

    mask = objective.mask.flatten().tolist()
    decoder_weight, decoder_bias = objective.decoder.weight.tolist(), objective.decoder.bias.tolist()
    images = torch.cat([x1, x2]).flatten(1).tolist()
    total, counted = 0.0, 0
    for image in images:
        masked = [0.0 if m else v for v, m in zip(image, mask)]
        z = [sum(masked[i] * weight[i, j].item() for i in range(numel)) for j in range(3)]
        for pixel in range(numel):
            if mask[pixel]:
                reconstruction = sum(decoder_weight[pixel][j] * z[j] for j in range(3)) + decoder_bias[pixel]
                total += (reconstruction - image[pixel]) ** 2
                counted += 1
    assert loss.item() == pytest.approx(total / counted, rel=1e-10)


def test_state_dict_round_trip_reproduces_future_masks():
    original = make(seed=11, input_shape=(1, 8, 8), patch_size=2)
    original.after_step(None, None)
    restored = make(seed=12, input_shape=(1, 8, 8), patch_size=2)
    assert not torch.equal(restored.mask, original.mask)
    restored.load_state_dict(original.state_dict())
    assert torch.equal(restored.mask, original.mask)
    for _ in range(2):
        original.after_step(None, None)
        restored.after_step(None, None)
        assert torch.equal(restored.mask, original.mask)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_ratio=0.0), "mask_ratio"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=0.1, patch_size=4), r"masks 0 of 4 patches"),
        (dict(mask_ratio=0.9, patch_size=4), r"masks 4 of 4 patches"),
        (dict(patch_size=3), "patch_size 3 must divide"),
        (dict(patch_size=0), "patch_size"),
        (dict(input_shape=()), "input_shape"),
        (dict(input_shape=(3, 0, 8)), "input_shape"),
        (dict(embed_dim=0), "embed_dim"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_rejects_inputs_of_wrong_shape():
    objective = make(input_shape=(4,), embed_dim=2)
    x = torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected input_shape \(4,\)"):
        objective(lambda v: v[:, :2], x, x)
