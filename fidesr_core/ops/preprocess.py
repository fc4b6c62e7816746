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

Bounds (docs/algorithm.md §2.1): the min-side rule never stretches the long side past
``MAX_PRESCALE_ASPECT`` × the short-side target (2048 px at ×4), so a thin strip is not blown up
to gigapixels; an image whose processing size would exceed ``MAX_PROCESSING_PIXELS``, or whose
short side would end below one latent pixel, is refused before anything is allocated.
Pixels must be finite and in [0, 1]; values at most ``RANGE_TOLERANCE`` outside (resampling
overshoot) are clamped, anything else (0-255 data, [-1, 1] data, integer tensors) is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ImageInputError, SettingsError

__all__ = [
    "MAX_PRESCALE_ASPECT",
    "MAX_PROCESSING_PIXELS",
    "PreparedImage",
    "check_unit_range",
    "processing_size",
    "resize_image",
    "prepare_lq",
    "resize_to_output",
]

PROCESS_SIZE = 512  # SD 2.1-base resolution; the released script's process_size
MAX_PRESCALE_ASPECT = 16  # the min-side rule stretches the long side to at most 16x the short-side target
# A 16384 x 16384 network input; the whole-image tensors cost about 170 bytes per processing pixel
# (fp32, CPU, measured), so this is about 45 GB: anything larger is refused, not attempted.
MAX_PROCESSING_PIXELS = 2**28
MIN_PROCESSING_SIDE = 8  # one latent pixel
RANGE_TOLERANCE = 0.25  # how far outside [0, 1] resampling overshoot may go before data counts as wrong


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


def _prescaled_size(height: int, width: int, min_side: float) -> tuple[int, int]:
    """The min-side rule: lift the short side to ``min_side``, the long side capped at ``16 × min_side``."""
    short_side, long_side = min(height, width), max(height, width)
    if short_side >= min_side:
        return height, width
    factor = min_side / short_side
    long_cap = MAX_PRESCALE_ASPECT * min_side
    if factor * long_side > long_cap:  # a thin strip: stretch only as far as the long side allows
        factor = max(1.0, long_cap / long_side)
        new_short, new_long = max(int(factor * short_side), short_side), max(int(factor * long_side), long_side)
    else:
        new_short = math.ceil(min_side - 1e-9)  # exact short side, free of float truncation
        # The long side uses int() truncation, as PIL size arithmetic in the released script.
        new_long = max(int(factor * long_side), new_short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def processing_size(
    height: int,
    width: int,
    *,
    upscale_by: float = 4.0,
    process_size: int = PROCESS_SIZE,
    max_pixels: int = MAX_PROCESSING_PIXELS,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((pre_h, pre_w), (proc_h, proc_w))``: size after the min-side rule, and the network's input size.

    Raises ``ImageInputError`` for an image that would be processed at more than ``max_pixels``
    or at less than 8 px on a side.
    """
    if height < 1 or width < 1:
        raise ImageInputError(f"image is {width}x{height} pixels; it needs at least 1x1")
    if not (math.isfinite(upscale_by) and 1.0 <= upscale_by <= 16.0):
        raise SettingsError(f"upscale_by must be between 1 and 16, got {upscale_by}")
    pre_h, pre_w = _prescaled_size(height, width, process_size / upscale_by)
    up_h, up_w = round(pre_h * upscale_by), round(pre_w * upscale_by)
    proc_h, proc_w = up_h - up_h % 8, up_w - up_w % 8
    if min(proc_h, proc_w) < MIN_PROCESSING_SIDE:
        raise ImageInputError(
            f"image is {width}x{height} pixels: too thin to upscale (its short side would be {min(up_h, up_w)} px "
            f"at ×{upscale_by:g}; at least {MIN_PROCESSING_SIDE} are needed)"
        )
    if proc_h * proc_w > max_pixels:
        raise ImageInputError(
            f"image is {width}x{height} pixels: at ×{upscale_by:g} it would be processed at {proc_w}x{proc_h} "
            f"({proc_h * proc_w / 1e6:.0f} megapixels), more than the {max_pixels / 1e6:.0f} megapixels this "
            "engine processes in one piece; use a smaller upscale factor or split the image"
        )
    return (pre_h, pre_w), (proc_h, proc_w)


def check_unit_range(image: torch.Tensor) -> None:
    """Refuse pixels that are not finite floats in [0, 1] (within ``RANGE_TOLERANCE``, which is clamped)."""
    if not torch.is_floating_point(image):
        raise ImageInputError(
            f"expected float pixels in [0, 1], got a {str(image.dtype).removeprefix('torch.')} tensor "
            "(for 8-bit data use image.float() / 255)"
        )
    if image.numel() == 0:
        return
    finite = torch.isfinite(image)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ImageInputError(f"the image has {bad} NaN or infinite pixel value(s); expected finite values in [0, 1]")
    low, high = float(image.min()), float(image.max())
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        hint = (
            " (0-255 data: divide by 255)" if high > 2.0 else " ([-1, 1] data: use (x + 1) / 2)" if low < -0.5 else ""
        )
        raise ImageInputError(f"expected pixels in [0, 1], got values from {low:g} to {high:g}{hint}")


def prepare_lq(image: torch.Tensor, *, upscale_by: float = 4.0, process_size: int = PROCESS_SIZE) -> PreparedImage:
    """``[B, 3, H, W]`` float in ``[0, 1]`` -> network input and the final output size.

    Sizes are checked first, then the pixels (``check_unit_range``), before anything is resized.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ImageInputError(f"expected an RGB batch [B, 3, H, W], got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    pre_size, proc_size = processing_size(height, width, upscale_by=upscale_by, process_size=process_size)
    check_unit_range(image)
    upscaled = resize_image(image.float().clamp(0.0, 1.0), pre_size)
    up_size = (round(pre_size[0] * upscale_by), round(pre_size[1] * upscale_by))
    upscaled = resize_image(resize_image(upscaled, up_size), proc_size)
    output_size = (round(height * upscale_by), round(width * upscale_by))
    return PreparedImage(pixels=upscaled * 2.0 - 1.0, output_size=output_size)


def resize_to_output(image: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Resize the restored ``[B, 3, H, W]`` in ``[0, 1]`` to ``output_size`` when it differs."""
    return resize_image(image, output_size)
