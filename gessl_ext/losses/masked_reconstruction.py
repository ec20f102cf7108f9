"""A generative objective in the spirit of MAE: reconstruct masked patches from the embedding."""
import math

import torch
from torch import nn

from ._checks import check_positive_int, check_unit_interval
from .base import SSLObjective


class MaskedReconstruction(SSLObjective):
    """loss = mean over the 2N images of both views of the squared error on the masked pixels between
    ``decoder(embed(masked x))`` reshaped to ``input_shape`` and x, where masked pixels are set to 0.

    input_shape: shape of one input, ``(D,)`` for flat vectors or ``(C, *spatial)`` (e.g. (C, H, W)).
    The mask is a grid of patches of side ``patch_size`` over the spatial dims (all channels share
    it; for flat inputs, runs of ``patch_size`` features). Default patch_size: 1 for flat inputs,
    4 otherwise. ``mask_ratio * num_patches`` rounded to the nearest int (halves up) patches are
    masked; this must be between 1 and num_patches - 1.
    ``decoder`` is Linear(embed_dim, prod(input_shape)), trainable and part of the objective.

    The mask is one fixed bool buffer ``mask`` [*input_shape] (True = masked), shared by all tasks
    and samples of an outer step and resampled in ``after_step`` by the objective's own CPU
    ``torch.Generator`` (``generator`` if given, which the objective then owns and advances, else one
    seeded from torch's default generator).
    The generator state is mirrored in the buffer ``generator_state``, so ``state_dict`` round trips
    reproduce the future masks.
    """

    def __init__(self, input_shape, embed_dim: int, mask_ratio: float = 0.75, patch_size: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.input_shape = self._checked_shape(input_shape)
        check_positive_int("embed_dim", embed_dim)
        check_unit_interval("mask_ratio", mask_ratio, open_interval=True)
        has_channels = len(self.input_shape) > 1
        self.patch_size = check_positive_int("patch_size", (4 if has_channels else 1) if patch_size is None else patch_size)
        spatial = self.input_shape[1:] if has_channels else self.input_shape
        if any(size % self.patch_size for size in spatial):
            raise ValueError(f"patch_size {self.patch_size} must divide the spatial dims {spatial} of input_shape")
        self.patch_grid = tuple(size // self.patch_size for size in spatial)
        num_patches = math.prod(self.patch_grid)
        self.num_masked_patches = int(mask_ratio * num_patches + 0.5)
        if not 1 <= self.num_masked_patches <= num_patches - 1:
            raise ValueError(
                f"mask_ratio {mask_ratio} masks {self.num_masked_patches} of {num_patches} patches; need between 1 and {num_patches - 1}"
            )
        self.mask_ratio = mask_ratio
        channels = self.input_shape[0] if has_channels else 1
        self.num_masked_pixels = self.num_masked_patches * self.patch_size ** len(spatial) * channels
        self.decoder = nn.Linear(embed_dim, math.prod(self.input_shape))
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        elif generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        self.generator = generator
        self.register_buffer("generator_state", generator.get_state())
        self.register_buffer("mask", torch.zeros(self.input_shape, dtype=torch.bool))
        self.resample_mask_()

    @staticmethod
    def _checked_shape(input_shape):
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"input_shape must be a non-empty sequence of positive ints, got {input_shape!r}")
        return shape

    @torch.no_grad()
    def resample_mask_(self):
        """Draw a new patch mask from the objective's generator (continuing from ``generator_state``)."""
        self.generator.set_state(self.generator_state.cpu())
        order = torch.randperm(math.prod(self.patch_grid), generator=self.generator)
        patch_mask = torch.zeros(order.shape, dtype=torch.bool)
        patch_mask[order[: self.num_masked_patches]] = True
        pixel_mask = patch_mask.reshape(self.patch_grid)
        for dim in range(pixel_mask.dim()):
            pixel_mask = pixel_mask.repeat_interleave(self.patch_size, dim=dim)
        self.mask.copy_(pixel_mask.expand(self.input_shape))
        self.generator_state.copy_(self.generator.get_state())

    def after_step(self, model, views):
        self.resample_mask_()

    def forward(self, embed, x1, x2):
        x = torch.cat([x1, x2])
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"inputs have shape {tuple(x.shape[1:])} per sample, expected input_shape {self.input_shape}")
        reconstruction = self.decoder(embed(x.masked_fill(self.mask, 0))).reshape(x.shape)
        squared_error = torch.where(self.mask, (reconstruction - x).pow(2), 0)
        return squared_error.sum() / (self.num_masked_pixels * x.shape[0])

    def extra_repr(self):
        return f"input_shape={self.input_shape}, mask_ratio={self.mask_ratio}, patch_size={self.patch_size}"
