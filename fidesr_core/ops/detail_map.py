"""Detail maps and percentile normalisation (docs/algorithm.md §4, also used by DAW in training).

Sobel magnitude, absolute Laplacian and local variance of the luminance, on single-channel maps, a strip of
rows at a time (``row_strips``) and in place, one image at a time: a 4096² map costs a few single-channel copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .row_strips import by_row_strips

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def _filter3(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate single-channel ``[B, 1, H, W]`` with a 3x3 kernel, replicate padding."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel.to(device=x.device, dtype=x.dtype).view(1, 1, 3, 3))


def luminance(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of ``[B, 3, H, W]`` -> ``[B, 1, H, W]``."""
    red, green, blue = image[:, 0:1], image[:, 1:2], image[:, 2:3]
    return 0.299 * red + 0.587 * green + 0.114 * blue


def box_blur3(x: torch.Tensor) -> torch.Tensor:
    """3x3 mean filter with replicate padding on ``[B, 1, H, W]``."""
    return _filter3(x, torch.full((3, 3), 1.0 / 9.0))


def sobel_magnitude(gray: torch.Tensor) -> torch.Tensor:
    kernel_x = torch.tensor(_SOBEL_X)
    magnitude = _filter3(gray, kernel_x).square_()
    return magnitude.add_(_filter3(gray, kernel_x.t().contiguous()).square_()).sqrt_()


def laplacian_magnitude(gray: torch.Tensor) -> torch.Tensor:
    return _filter3(gray, torch.tensor(_LAPLACIAN)).abs_()


def local_variance(gray: torch.Tensor) -> torch.Tensor:
    return box_blur3(torch.sub(gray, box_blur3(gray)).square_())


def exact_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile`` of all elements (linear interpolation), at any size (it stops at 2**24 elements)."""
    flat = values.reshape(-1).float()
    count = flat.numel()
    if count == 0:
        raise ValueError("quantile of an empty tensor")
    position = q * (count - 1)
    lower_index = int(position)
    fraction = position - lower_index
    upper_index = min(lower_index + 1, count - 1)
    try:
        lower = torch.kthvalue(flat, lower_index + 1).values
        upper = torch.kthvalue(flat, upper_index + 1).values if upper_index != lower_index else lower
    except (NotImplementedError, RuntimeError):  # e.g. kthvalue missing on some backends
        ordered = torch.sort(flat).values
        lower, upper = ordered[lower_index], ordered[upper_index]
    return torch.lerp(lower, upper, torch.tensor(fraction, dtype=flat.dtype, device=flat.device))


def percentile_normalize(x: torch.Tensor, *, low: float = 0.05, high: float = 0.95) -> torch.Tensor:
    """Per-image ``clamp((x - q_low) / (q_high - q_low + 1e-6), 0, 1)`` on ``[B, C, H, W]``."""
    x = x.float()
    normalized = torch.empty_like(x, memory_format=torch.contiguous_format)
    for sample, out in zip(x, normalized, strict=True):
        q_low = exact_quantile(sample, low)
        q_high = exact_quantile(sample, high)
        torch.sub(sample, q_low, out=out).div_(q_high - q_low + 1e-6).clamp_(0.0, 1.0)
    return normalized


_STRUCTURE_HALO = 3  # rows: the local variance stacks two 3x3 filters, each spoiling one edge row


def _structure(gray: torch.Tensor) -> torch.Tensor:
    """Mean of the three structure measures of ``gray`` ``[B, 1, H, W]``."""
    return sobel_magnitude(gray).add_(laplacian_magnitude(gray)).add_(local_variance(gray)).div_(3.0)


def detail_map(image: torch.Tensor, *, shift_to_unit: bool = True) -> torch.Tensor:
    """Detail map ``D`` of ``[B, 3, H, W]`` in ``[-1, 1]`` -> ``[B, 1, H, W]`` in ``[0, 1]``, float32; inference
    shifts the image to ``[0, 1]`` first, the released trainer's DAW map does not (``shift_to_unit=False``)."""
    maps = []
    for index in range(image.shape[0]):
        gray = luminance(image[index : index + 1].float())  # [1, 1, H, W]
        if shift_to_unit:
            gray.add_(1.0).mul_(0.5)
        structure = by_row_strips(_structure, gray, halo=_STRUCTURE_HALO)
        del gray
        maps.append(by_row_strips(box_blur3, percentile_normalize(structure), halo=1))
    return maps[0] if len(maps) == 1 else torch.cat(maps, dim=0)
