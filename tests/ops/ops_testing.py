"""Comparison helpers shared by the custom-op tests."""
import torch

# Relative tolerances (max-abs error over max-abs reference) per input dtype, as the kernels promise.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_close_rel(actual, expected, rtol, floor=0.0, what=""):
    """max|actual - expected| <= rtol * max(max|expected|, floor), and every element of actual is finite.

    ``floor`` keeps the bound meaningful where the reference is ~0 (e.g. gradients with d = 1).
    """
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite (unwritten?) elements in the result"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rtol * scale, f"{what}: max error {error:.3e} > {rtol:.1e} * {scale:.3e}"


def randn(shape, generator, dtype=torch.float32, device="cpu"):
    """Seeded standard normal tensor (drawn in float64 on the CPU, then cast and moved)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def d1_floor(z):
    """Scale floor for head gradients: with d = 1 the cosines are +-1 and the exact gradient is 0, so
    the result is rounding noise of terms of size ~1e-2..1; otherwise no floor."""
    return 1e-2 if z.shape[-1] == 1 else 0.0
