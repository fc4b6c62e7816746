"""Overlapping tiles with Gaussian blending for the U-Net pass (docs/algorithm.md §2.6, §9), as released but with
each axis clamped to the latent before the Gaussian is built (the released code crashes on a short side below it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..progress import CancelCheck, ProgressCallback, check_cancelled


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``tile``; last tile flush with the end."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    count = 1 + math.ceil((length - tile) / stride)
    return [min(index * stride, length - tile) for index in range(count)]


def _gaussian_1d(size: int, centre_shift: float = 0.0) -> torch.Tensor:
    positions = torch.arange(size, dtype=torch.float64)
    sigma = 0.1 * size
    return torch.exp(-((positions - (size - 1) / 2 - centre_shift) ** 2) / (2 * sigma**2))


def gaussian_tile_weight(height: int, width: int, *, row_shift: float = 0.0) -> torch.Tensor:
    """Separable blend weight ``[height, width]`` (float32), peak 1 at the centre (rows: ``row_shift`` lower)."""
    return torch.outer(_gaussian_1d(height, row_shift), _gaussian_1d(width)).to(torch.float32)


def needs_tiling(height: int, width: int, tile_size: int) -> bool:
    """The released rule: tile only when the latent area exceeds ``tile_size²``; 0 disables tiling."""
    return tile_size > 0 and height * width > tile_size * tile_size


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile_size: int,
    overlap: int,
    square_tiles: bool = False,
    weight_row_shift: float = 0.0,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Apply ``fn`` (``[B, C, th, tw] -> [B, C', th, tw]``) tile by tile and blend (once if small); float32.

    ``square_tiles``: the tile is ``min(tile_size, h, w)`` on both axes (OSEDiff's tiler); where that is no
    larger than ``overlap`` (the released loop would never end) the overlap becomes half the tile.
    """
    height, width = x.shape[-2:]
    if not needs_tiling(height, width, tile_size):
        check_cancelled(should_cancel)
        out = fn(x).float()
        if progress is not None:
            progress(1, 1)
        return out
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    if square_tiles:
        tile_h = tile_w = min(tile_h, tile_w)
        overlap = overlap if overlap < tile_h else tile_h // 2
    boxes = [
        (top, left) for top in tile_starts(height, tile_h, overlap) for left in tile_starts(width, tile_w, overlap)
    ]
    weight = gaussian_tile_weight(tile_h, tile_w, row_shift=weight_row_shift).to(x.device)
    blended: torch.Tensor | None = None
    weight_sum = torch.zeros((height, width), device=x.device, dtype=torch.float32)
    for done, (top, left) in enumerate(boxes, start=1):
        check_cancelled(should_cancel)
        tile_out = fn(x[..., top : top + tile_h, left : left + tile_w]).float()
        if blended is None:
            blended = torch.zeros((*tile_out.shape[:2], height, width), device=x.device, dtype=torch.float32)
        blended[..., top : top + tile_h, left : left + tile_w] += tile_out * weight
        weight_sum[top : top + tile_h, left : left + tile_w] += weight
        if progress is not None:
            progress(done, len(boxes))
    assert blended is not None
    return blended / weight_sum
