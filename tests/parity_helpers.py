"""Comparison and test-image helpers shared by the step-level parity tests (``test_parity_*steps.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ATOL", "assert_matches_reference", "smooth_image"]

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
