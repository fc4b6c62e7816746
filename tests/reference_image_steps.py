"""Independent re-implementation of the released FiDeSR code's image steps around the network (docs/algorithm.md §2.1, §2.6, §2.9).

Latent tiling with Gaussian blending, the AdaIN and wavelet colour fixes, and the
pre-processing (min-side pre-scale, ×upscale, sizes to multiples of 8), with PIL's
bicubic resampler written out.  Same rules as ``reference_impl.py``: written from
docs/algorithm.md (and facts read in the released test code), never from
``fidesr_core``, deliberately unoptimised; images ``[B, 3, H, W]`` in float32.

Details the algorithm page leaves open, as read here (all confirmed in the released code):

* the min-side pre-scale and the final resize-back use PIL's default filter,
  bicubic (a = −0.5), sizes truncated with ``int``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ref_tile_starts",
    "ref_gaussian_1d",
    "ref_tiled",
    "ref_adain",
    "ref_wavelet",
    "ref_bicubic_resize",
    "ref_pil_bicubic_resize",
    "ref_prepare_lq",
]


# --------------------------------------------------------- latent tiling (docs/algorithm.md §2.6)


def ref_tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Count tiles as the released loop does, then snap the last one to the border."""
    count = 0
    covered = 0
    while covered < length:
        covered = max(count * tile - overlap * count, 0) + tile
        count += 1
    starts = [max(i * tile - overlap * i, 0) for i in range(count)]
    starts[-1] = length - tile
    return starts


def ref_gaussian_1d(size: int) -> torch.Tensor:
    centre = (size - 1) / 2
    sigma = 0.1 * size
    return torch.tensor([math.exp(-((i - centre) ** 2) / (2 * sigma**2)) for i in range(size)], dtype=torch.float64)


def ref_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int = 96,
    overlap: int = 32,
    *,
    square_clamp: bool = False,
) -> torch.Tensor:
    """Released tiling with the crash fixed: clamp the tile first, then build the weights.

    ``square_clamp=True`` clamps to ``min(h, w)`` on both axes as the released code does;
    ``False`` clamps each axis to its own length.
    """
    height, width = x.shape[-2:]
    if height * width <= tile * tile:
        return fn(x).float()
    tile_h = min(tile, min(height, width)) if square_clamp else min(tile, height)
    tile_w = min(tile, min(height, width)) if square_clamp else min(tile, width)
    weight = torch.outer(ref_gaussian_1d(tile_h), ref_gaussian_1d(tile_w)).float()
    total = None
    weights = torch.zeros(height, width)
    for top in ref_tile_starts(height, tile_h, overlap):
        for left in ref_tile_starts(width, tile_w, overlap):
            out = fn(x[:, :, top : top + tile_h, left : left + tile_w]).float()
            if total is None:
                total = torch.zeros(x.shape[0], out.shape[1], height, width)
            total[:, :, top : top + tile_h, left : left + tile_w] += out * weight
            weights[top : top + tile_h, left : left + tile_w] += weight
    assert total is not None
    return total / weights


# ------------------------------------------------------------ colour fix (docs/algorithm.md §2.9)


def ref_adain(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(image)
    for b in range(image.shape[0]):
        for c in range(image.shape[1]):
            img = image[b, c]
            ref = reference[b, c]
            img_std = torch.sqrt(img.var() + 1e-5)  # unbiased variance, as torch.var by default
            ref_std = torch.sqrt(ref.var() + 1e-5)
            out[b, c] = (img - img.mean()) / img_std * ref_std + ref.mean()
    return out.clamp(0.0, 1.0)


def _wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = (torch.outer(taps, taps) / 16.0).to(x.dtype)
    weight = kernel.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    padded = F.pad(x, (dilation, dilation, dilation, dilation), mode="replicate")
    return F.conv2d(padded, weight, groups=x.shape[1], dilation=dilation)


def _wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(x)
    current = x
    for level in range(levels):
        low = _wavelet_blur(current, 2**level)
        high = high + (current - low)
        current = low
    return high, current


def ref_wavelet(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    image_high, _ = _wavelet_split(image)
    _, reference_low = _wavelet_split(reference)
    return (image_high + reference_low).clamp(0.0, 1.0)


# --------------------------------------------------------- pre-processing (docs/algorithm.md §2.1)


def ref_bicubic_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL bicubic (a = −0.5) on float images in [0, 1], saturated like 8-bit PIL output."""
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)


def _pil_bicubic_kernel(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _pil_resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` weights of PIL's separable resampler (``precompute_coeffs``) for the bicubic filter."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        taps = [_pil_bicubic_kernel((j - centre + 0.5) / filter_scale) for j in range(first, last)]
        total = sum(taps)
        for j, tap in zip(range(first, last), taps, strict=True):
            matrix[i, j] = tap / total if total else 0.0
    return matrix


def ref_pil_bicubic_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's bicubic resampling of a float ``[H, W, C]`` array, in float64 (horizontal pass, then vertical)."""
    rows = _pil_resample_matrix(image.shape[0], size[0])
    columns = _pil_resample_matrix(image.shape[1], size[1])
    horizontal = np.einsum("wj,hjc->hwc", columns, image.astype(np.float64))
    return np.einsum("hi,iwc->hwc", rows, horizontal)


def ref_prepare_lq(
    image: torch.Tensor, upscale: int = 4, process_size: int = 512
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, 3, H, W]`` in [0, 1] -> (network input in [−1, 1], final output size)."""
    height, width = image.shape[-2:]
    output_size = (height * upscale, width * upscale)
    minimum = process_size // upscale
    if width < minimum or height < minimum:
        scale = minimum / min(width, height)
        image = ref_bicubic_resize(image, (int(scale * height), int(scale * width)))
        output_size = (int(upscale * height), int(upscale * width))
    height, width = image.shape[-2:]
    image = ref_bicubic_resize(image, (height * upscale, width * upscale))
    height, width = image.shape[-2:]
    if height % 8 or width % 8:  # the released code uses Lanczos here; the tests avoid such sizes
        image = ref_bicubic_resize(image, (height - height % 8, width - width % 8))
    return image * 2.0 - 1.0, output_size
