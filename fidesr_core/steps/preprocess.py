"""Input sizing of the released test script (docs/algorithm.md §2.1), generalised to any scale.

``prepare_lq`` turns an LQ image into the network's input: pre-scale images
whose short side would end below ``process_size`` after upscaling, bicubic
``× upscale_by``, shrink each side to a multiple of 8, map to ``[-1, 1]``.
``resize_to_output`` brings the result to exactly ``round(upscale_by · size)``
of the original.  The released script only resizes back for pre-scaled
images, so an odd-sized input comes out a few pixels short there; here the
output always has the requested size.

Resampling is torch bicubic with ``antialias=True``, which uses PIL's kernel
(a = −0.5; plain torch bicubic uses a = −0.75).  The released code shrinks to
the multiple of 8 with PIL's Lanczos; torch has no Lanczos, so bicubic is used
(this only touches sizes that are not multiples of 8 after upscaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ImageInputError, SettingsError

__all__ = ["PreparedImage", "processing_size", "resize_image", "prepare_lq", "resize_to_output"]

PROCESS_SIZE = 512  # SD 2.1-base resolution; the released script's process_size


@dataclass(frozen=True)
class PreparedImage:
    pixels: torch.Tensor  # [B, 3, H, W] in [-1, 1], float32, H and W multiples of 8
    output_size: tuple[int, int]  # (height, width) the final image must have


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL-style bicubic resize of ``[B, C, H, W]`` in ``[0, 1]`` to ``size`` (h, w), clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = F.interpolate(image.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0.0, 1.0)


def processing_size(
    height: int, width: int, *, upscale_by: float = 4.0, process_size: int = PROCESS_SIZE
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((pre_h, pre_w), (proc_h, proc_w))``: size after the min-side rule, and the network's input size."""
    if height < 1 or width < 1:
        raise ImageInputError(f"image is {width}x{height} pixels; it needs at least 1x1")
    if not 1.0 <= upscale_by <= 16.0:
        raise SettingsError(f"upscale_by must be between 1 and 16, got {upscale_by}")
    min_side = process_size / upscale_by
    if min(height, width) < min_side:
        factor = min_side / min(height, width)
        short = math.ceil(min_side - 1e-9)  # exact short side, free of float truncation
        # The long side uses int() truncation, as PIL size arithmetic in the released script.
        if height <= width:
            height, width = short, max(int(factor * width), short)
        else:
            height, width = max(int(factor * height), short), short
    up_h, up_w = round(height * upscale_by), round(width * upscale_by)
    proc_h, proc_w = up_h - up_h % 8, up_w - up_w % 8
    return (height, width), (proc_h, proc_w)


def prepare_lq(image: torch.Tensor, *, upscale_by: float = 4.0, process_size: int = PROCESS_SIZE) -> PreparedImage:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> network input and the final output size."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ImageInputError(f"expected an RGB batch [B, 3, H, W], got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    pre_size, proc_size = processing_size(height, width, upscale_by=upscale_by, process_size=process_size)
    upscaled = resize_image(image.float().clamp(0.0, 1.0), pre_size)
    up_size = (round(pre_size[0] * upscale_by), round(pre_size[1] * upscale_by))
    upscaled = resize_image(resize_image(upscaled, up_size), proc_size)
    output_size = (round(height * upscale_by), round(width * upscale_by))
    return PreparedImage(pixels=upscaled * 2.0 - 1.0, output_size=output_size)


def resize_to_output(image: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Resize the restored ``[B, 3, H, W]`` in ``[0, 1]`` to ``output_size`` when it differs."""
    return resize_image(image, output_size)
