"""Comparison and test-image helpers shared by the step-level parity tests (``test_parity_*steps.py``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ATOL", "assert_matches_reference", "smooth_image", "eight_bit_difference", "assert_eight_bit_close"]

ATOL = 1e-5  # float32 round-off on values of order 1


def assert_matches_reference(
    actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = 1e-5
) -> None:
    """Same shape, finite, and equal to float32 round-off."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def smooth_image(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """An image in [−1, 1] with both smooth regions and edges (noise blurred at a coarse scale, plus fine noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(height // 8, 1), max(width // 8, 1), generator=generator)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    image = image + 0.05 * torch.randn(batch, 3, height, width, generator=generator)
    return (image * 2 - 1).clamp(-1, 1)


def eight_bit_difference(actual: torch.Tensor, expected: torch.Tensor) -> tuple[int, float, float]:
    """(max difference in 8-bit levels, fraction of values that differ, PSNR in dB) of two images in [0, 1]."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    levels = ((actual.float() * 255).round() - (expected.float() * 255).round()).abs()
    mse = float(((actual.float() - expected.float()) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(1 / mse)
    return int(levels.max()), float((levels > 0).float().mean()), psnr


def assert_eight_bit_close(
    actual: torch.Tensor, expected: torch.Tensor, *, max_levels: int = 1, max_fraction: float = 1e-3
) -> None:
    """Both are 8-bit images (every value k / 255); they differ by at most ``max_levels`` levels, in at most
    ``max_fraction`` of the values (float round-off in the networks flips a truncation now and then)."""
    for image in (actual, expected):
        levels = (image.float() * 255).round()
        assert torch.equal(levels / 255, image.float()), "not an 8-bit image"
    worst, fraction, psnr = eight_bit_difference(actual, expected)
    print(f"max {worst} level(s), {fraction:.2e} of the values differ, PSNR {psnr:.1f} dB")
    assert worst <= max_levels and fraction <= max_fraction, (worst, fraction, psnr)
