"""Input sizing and resampling of the released test scripts, generalised to any scale (docs/algorithm.md §2.1,
§2.8, §2.9).  8-bit images (every value ``k / 255``) go the released way, through PIL with the released
truncations; other images keep their precision on the float path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ImageInputError
from ..settings import PROCESS_SIZE, ColorFixMethod
from .color_fix import apply_color_fix

MAX_PRESCALE_ASPECT = 16  # the min-side rule stretches the long side to at most 16x the short-side target
# 16384²: at the ~170 bytes a processing pixel the whole-image tensors cost (fp32, CPU), ~45 GB; larger is refused.
MAX_PROCESSING_PIXELS = 2**28
MIN_PROCESSING_SIDE = 8  # one latent pixel
RANGE_TOLERANCE = 0.25  # how far outside [0, 1] resampling overshoot may go before data counts as wrong


@dataclass(frozen=True)
class PreparedImage:
    pixels: torch.Tensor  # [B, 3, H, W] in [-1, 1], float32, H and W multiples of 8
    output_size: tuple[int, int]  # (height, width) the final image must have
    eight_bit: tuple[bool, ...] = ()  # per image: prepared the released way, through PIL on 8 bits


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL-style bicubic resize of ``[B, C, H, W]`` in ``[0, 1]`` to ``size`` (h, w) in float, clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = F.interpolate(image.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0.0, 1.0)


_CHECK_CHUNK = 1 << 22  # values checked at a time: temporaries of 16 MB, not of the whole image


def _is_eight_bit(values: torch.Tensor) -> bool:
    """Whether every value is exactly ``k / 255`` (float32) for an integer ``k`` in 0..255; stops at the first chunk
    that is not."""
    flat = values.reshape(-1)
    for start in range(0, flat.numel(), _CHECK_CHUNK):
        chunk = flat[start : start + _CHECK_CHUNK].float()
        if not torch.equal(chunk.mul(255.0).round_().div_(255.0), chunk):
            return False
    low, high = torch.aminmax(flat) if flat.numel() else (flat.new_zeros(()), flat.new_zeros(()))
    return bool(low >= 0.0) and bool(high <= 1.0)


def _network_levels(pixels: torch.Tensor) -> torch.Tensor | None:
    """``k`` for a network input ``[3, H, W]`` in [-1, 1] that is ``k / 255 · 2 − 1`` exactly (float32), as
    ``prepare_lq`` makes it from an 8-bit image (the released ``to_tensor(image) * 2 - 1``); else None."""
    pixels = pixels.float()
    levels = pixels.add(1.0).mul_(127.5).round_().clamp_(0.0, 255.0)
    return levels if torch.equal(levels.div(255.0).mul_(2.0).sub_(1.0), pixels) else None


def _to_pil(image: torch.Tensor) -> Image.Image:
    """One 8-bit-valued ``[3, H, W]`` float image -> the 8-bit RGB PIL image it stands for (on the CPU)."""
    levels = image.float().mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8).cpu()
    return Image.merge("RGB", [Image.fromarray(plane.numpy()) for plane in levels])


def _from_pil(image: Image.Image, device: torch.device) -> torch.Tensor:
    """An 8-bit RGB PIL image -> ``[3, H, W]`` float32 ``k / 255`` on ``device`` (torchvision's ``to_tensor``)."""
    planes = torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))
    return planes.to(device).float().div_(255.0)


def _pil_resize(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """``Image.resize`` to ``size`` (h, w), as the released scripts call it; PIL rounds each pass to 8 bits."""
    return image.resize((size[1], size[0]), resample)


def _prescaled_size(height: int, width: int, upscale_by: float, process_size: int) -> tuple[int, int]:
    """The min-side rule: lift the short side to ``process_size / upscale_by``, the long side capped at 16 times that.

    Integer factors follow the released arithmetic exactly: threshold ``process_size // upscale_by``,
    ``scale = threshold / short side``, each side ``int(scale · side)`` (float truncation makes a short
    side of 49, 98, 103 or 107 px at ×4 come out 127, not 128).  Other factors lift the short side to
    exactly ``ceil(process_size / upscale_by)``.
    """
    integer_factor = float(upscale_by).is_integer()
    min_side = process_size // int(upscale_by) if integer_factor else process_size / upscale_by
    short_side, long_side = min(height, width), max(height, width)
    if short_side >= min_side:
        return height, width
    factor = min_side / short_side
    long_cap = MAX_PRESCALE_ASPECT * min_side
    if factor * long_side > long_cap:  # a thin strip: stretch only as far as the long side allows
        factor = max(1.0, long_cap / long_side)
        new_short, new_long = max(int(factor * short_side), short_side), max(int(factor * long_side), long_side)
    elif integer_factor:  # the released script: PIL sizes int(scale * side)
        new_short, new_long = int(factor * short_side), int(factor * long_side)
    else:
        new_short = math.ceil(min_side - 1e-9)  # exact short side, free of float truncation
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
    """``((pre_h, pre_w), (proc_h, proc_w))``: size after the min-side rule, and the network's input size;
    ``ImageInputError`` beyond ``max_pixels`` or below 8 px on a side."""
    if height < 1 or width < 1:
        raise ImageInputError(f"image is {width}x{height} pixels; it needs at least 1x1")
    pre_h, pre_w = _prescaled_size(height, width, upscale_by, process_size)
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


def _prepare_float(
    image: torch.Tensor, pre_size: tuple[int, int], up_size: tuple[int, int], proc_size: tuple[int, int]
) -> torch.Tensor:
    """The float path: bicubic in float for all three resizes; ``[B, 3, H, W]`` in [0, 1]."""
    upscaled = resize_image(image.float().clamp(0.0, 1.0), pre_size)
    return resize_image(resize_image(upscaled, up_size), proc_size)


def _prepare_eight_bit(
    image: torch.Tensor, pre_size: tuple[int, int], up_size: tuple[int, int], proc_size: tuple[int, int]
) -> torch.Tensor:
    """The released steps on one 8-bit image ``[3, H, W]``: PIL bicubic, bicubic, Lanczos; ``k / 255``."""
    resized = _pil_resize(_to_pil(image), pre_size, Image.Resampling.BICUBIC)
    resized = _pil_resize(resized, up_size, Image.Resampling.BICUBIC)
    resized = _pil_resize(resized, proc_size, Image.Resampling.LANCZOS)
    return _from_pil(resized, image.device)


def prepare_lq(image: torch.Tensor, *, upscale_by: float = 4.0, process_size: int = PROCESS_SIZE) -> PreparedImage:
    """``[B, 3, H, W]`` float in ``[0, 1]`` -> network input and the final output size; sizes are checked
    first, then the pixels, before anything is resized."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ImageInputError(f"expected an RGB batch [B, 3, H, W], got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    pre_size, proc_size = processing_size(height, width, upscale_by=upscale_by, process_size=process_size)
    check_unit_range(image)
    up_size = (round(pre_size[0] * upscale_by), round(pre_size[1] * upscale_by))
    eight_bit = [_is_eight_bit(one) for one in image]

    def prepared(index: int) -> torch.Tensor:
        if eight_bit[index]:
            return _prepare_eight_bit(image[index], pre_size, up_size, proc_size)[None]
        return _prepare_float(image[index : index + 1], pre_size, up_size, proc_size)

    if any(eight_bit):
        upscaled = _per_image(image.shape[0], prepared)
    else:
        upscaled = _prepare_float(image, pre_size, up_size, proc_size)
    output_size = (round(height * upscale_by), round(width * upscale_by))
    # x · 2 − 1, in place (the released scripts: to_tensor(image) * 2 - 1)
    return PreparedImage(pixels=upscaled.mul_(2.0).sub_(1.0), output_size=output_size, eight_bit=tuple(eight_bit))


def _truncate_to_eight_bit(image: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """``to_tensor(to_pil_image(image))`` of ``[..., H, W]`` in [0, 1]: ``x · 255`` truncated, over 255."""
    scaled = image.mul_(255.0) if in_place else image.float().mul(255.0)
    return scaled.floor_().clamp_(0.0, 255.0).div_(255.0)


def color_fix_decoded(decoded: torch.Tensor, upscaled_lq: torch.Tensor, color_fix: ColorFixMethod) -> torch.Tensor:
    """Colour-fix the decoded ``[B, 3, H, W]`` in [0, 1] against the network input ``upscaled_lq`` (in [-1, 1]).

    An input from an 8-bit image (told from ``upscaled_lq``, float32 as made) takes the released steps: truncate
    to 8 bits (``to_pil_image``), colour-fix against the 8-bit input, truncate again (none: once).
    """
    upscaled_lq = upscaled_lq.to(decoded.device)
    size = tuple(decoded.shape[-2:])

    def fixed(index: int) -> torch.Tensor:
        one = decoded[index : index + 1]
        levels = _network_levels(upscaled_lq[index])
        if levels is None:
            reference = resize_image((upscaled_lq[index : index + 1].float() + 1.0).mul_(0.5), size)
            return apply_color_fix(one, reference, color_fix)
        target = _truncate_to_eight_bit(one)
        if color_fix == "none":
            return target
        reference = resize_image(levels.div_(255.0)[None], size)  # k / 255, as to_tensor gives it
        return _truncate_to_eight_bit(apply_color_fix(target, reference, color_fix), in_place=True)

    return _per_image(decoded.shape[0], fixed)


def _per_image(count: int, compute: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``[count, ...]`` from ``compute(index) -> [1, ...]``, written into one tensor (no copy for one image)."""
    first = compute(0)
    if count == 1:
        return first
    result = first.new_empty((count, *first.shape[1:]))
    result[0] = first[0]
    del first
    for index in range(1, count):
        result[index] = compute(index)[0]
    return result


def resize_to_output(image: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Resize the restored ``[B, 3, H, W]`` in ``[0, 1]`` to ``output_size`` when it differs; 8-bit images (as
    ``color_fix_decoded`` leaves the released path's) with PIL's bicubic, as the released scripts do."""
    if tuple(image.shape[-2:]) == tuple(output_size):
        return image

    def resized(index: int) -> torch.Tensor:
        one = image[index : index + 1]
        if not _is_eight_bit(one):
            return resize_image(one, output_size)
        return _from_pil(_pil_resize(_to_pil(one[0]), output_size, Image.Resampling.BICUBIC), image.device)[None]

    return _per_image(image.shape[0], resized)
