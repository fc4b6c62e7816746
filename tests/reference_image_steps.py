"""Independent re-implementation of the released code's image steps around the network (docs/algorithm.md §2.1, §2.6, §2.8, §2.9).

Latent tiling with Gaussian blending, the AdaIN and wavelet colour fixes, the pre-processing
(min-side pre-scale, ×upscale, sizes to multiples of 8) and the finishing after the decoder
(8-bit conversions, colour fix, resize back).  Same rules as ``reference_impl.py``: written from
docs/algorithm.md and facts read in the released test scripts (FiDeSR ``test_fidesr.py``,
PiSA-SR ``test_pisasr.py``, OSEDiff ``test_osediff.py`` and their shared
``wavelet_color_fix.py``), never from ``fidesr_core``, deliberately unoptimised; images
``[B, 3, H, W]`` in float32.

Details the algorithm page leaves open, as read here (all confirmed in the released code):

* the images are 8-bit PIL images: each ``resize`` rounds to 8 bits; the min-side pre-scale,
  the ``× upscale`` and the resize back use PIL's default filter, bicubic (a = −0.5), sizes
  truncated with ``int``; the multiple-of-8 step uses ``Image.LANCZOS``;
* torchvision's ``to_tensor`` is ``uint8 / 255`` in float32, its ``to_pil_image`` of a float image
  is ``(x · 255).astype(uint8)``, a truncation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "ref_tile_starts",
    "ref_gaussian_1d",
    "ref_tiled",
    "ref_adain",
    "ref_wavelet",
    "ref_is_eight_bit",
    "ref_to_uint8",
    "ref_lq_uint8",
    "ref_to_tensor",
    "ref_to_pil_array",
    "ref_pil_resize",
    "ref_released_lq",
    "ref_bicubic_resize",
    "ref_pil_bicubic_resize",
    "ref_prepare_lq",
    "ref_released_finish",
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


def _ref_mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, over ``reshape(b, c, -1)`` as released: mean and sqrt(unbiased variance + eps)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    return flat.mean(dim=2).reshape(b, c, 1, 1), (flat.var(dim=2) + eps).sqrt().reshape(b, c, 1, 1)


def ref_adain(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The released AdaIN: normalise ``image`` per channel, give it ``reference``'s statistics, clamp."""
    reference_mean, reference_std = _ref_mean_std(reference)
    image_mean, image_std = _ref_mean_std(image)
    normalized = (image - image_mean.expand(image.shape)) / image_std.expand(image.shape)
    return (normalized * reference_std.expand(image.shape) + reference_mean.expand(image.shape)).clamp(0.0, 1.0)


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
#
# The released test scripts (FiDeSR ``test_fidesr.py``, PiSA-SR ``test_pisasr.py``, OSEDiff
# ``test_osediff.py``) all read the LQ as an 8-bit RGB PIL image and resize it with PIL, so every
# resize rounds to 8 bits; torchvision's ``to_tensor`` divides by 255 in float32 and
# ``to_pil_image`` multiplies by 255 and truncates (``astype(uint8)``).  The PIL resizes here are
# PIL's own: that is the released computation.  Float images that are not 8-bit values (the
# engine's float path, ours) get the float reference: the same kernel without 8-bit rounding.


def ref_is_eight_bit(image: torch.Tensor) -> bool:
    """Whether every value of ``image`` is ``k / 255`` for an integer ``k`` in [0, 255] (float32)."""
    levels = (image.float() * 255.0).round()
    return bool(((levels / 255.0) == image.float()).all() and levels.min() >= 0 and levels.max() <= 255)


def ref_to_uint8(image: torch.Tensor) -> np.ndarray:
    """An 8-bit-valued ``[3, H, W]`` float image as the ``[H, W, 3]`` uint8 array it came from."""
    assert ref_is_eight_bit(image), "not an 8-bit image"
    return (image.float() * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def ref_lq_uint8(pixels: torch.Tensor) -> np.ndarray | None:
    """The 8-bit image whose ``to_tensor · 2 − 1`` is ``pixels`` ``[3, H, W]``, or None if there is none."""
    levels = ((pixels.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    array = levels.permute(1, 2, 0).numpy()
    return array if torch.equal(ref_to_tensor(array) * 2 - 1, pixels.float()) else None


def ref_to_tensor(array: np.ndarray) -> torch.Tensor:
    """torchvision ``to_tensor`` of an 8-bit RGB image: ``[3, H, W]`` float32, ``k / 255``."""
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


def ref_to_pil_array(image: torch.Tensor) -> np.ndarray:
    """torchvision ``to_pil_image`` of a float ``[3, H, W]``: times 255, truncated to uint8."""
    return (np.transpose(image.numpy(), (1, 2, 0)) * 255).astype(np.uint8)


def ref_pil_resize(array: np.ndarray, size: tuple[int, int], lanczos: bool = False) -> np.ndarray:
    """``Image.resize`` of an 8-bit RGB array to ``size`` (h, w): bicubic (PIL's default) or Lanczos."""
    resample = Image.Resampling.LANCZOS if lanczos else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(array, "RGB").resize((size[1], size[0]), resample))


def ref_released_lq(array: np.ndarray, upscale: int = 4, process_size: int = 512) -> tuple[np.ndarray, bool]:
    """The released scripts' input steps on an 8-bit ``[H, W, 3]`` array: (the network's 8-bit input, resize_flag).

    Short side below ``process_size // upscale``: resize (default filter) by ``scale = minimum / short``,
    sizes ``int(scale · side)``; then ``× upscale``; then each side down to a multiple of 8 with Lanczos.
    """
    ori_height, ori_width = array.shape[:2]
    minimum = process_size // upscale
    resize_flag = False
    if ori_width < minimum or ori_height < minimum:
        scale = minimum / min(ori_width, ori_height)
        array = ref_pil_resize(array, (int(scale * ori_height), int(scale * ori_width)))
        resize_flag = True
    array = ref_pil_resize(array, (array.shape[0] * upscale, array.shape[1] * upscale))
    height, width = array.shape[:2]
    array = ref_pil_resize(array, (height - height % 8, width - width % 8), lanczos=True)
    return array, resize_flag


def ref_bicubic_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of ``[B, 3, H, W]`` in [0, 1]: PIL on 8 bits for 8-bit images (released), else float.

    The float version is PIL's kernel (a = −0.5) without the 8-bit rounding, saturated like 8-bit output.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if ref_is_eight_bit(image):
        return torch.stack([ref_to_tensor(ref_pil_resize(ref_to_uint8(one), size)) for one in image])
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


def _ref_float_prepare(image: torch.Tensor, upscale: int, process_size: int) -> torch.Tensor:
    """The float path: the released sizes, PIL's bicubic kernel in float, bicubic also for the multiple of 8."""
    height, width = image.shape[-2:]
    minimum = process_size // upscale
    if width < minimum or height < minimum:
        scale = minimum / min(width, height)
        image = ref_bicubic_resize(image, (int(scale * height), int(scale * width)))
    height, width = image.shape[-2:]
    image = ref_bicubic_resize(image, (height * upscale, width * upscale))
    height, width = image.shape[-2:]
    return ref_bicubic_resize(image, (height - height % 8, width - width % 8))


def ref_prepare_lq(
    image: torch.Tensor, upscale: int = 4, process_size: int = 512
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, 3, H, W]`` in [0, 1] -> (network input in [−1, 1], final output size ``upscale × size``).

    8-bit images: the released PIL steps (``ref_released_lq``), then ``to_tensor · 2 − 1``.
    Other images: the float path (``_ref_float_prepare``).
    """
    height, width = image.shape[-2:]
    output_size = (upscale * height, upscale * width)
    if ref_is_eight_bit(image):
        pixels = torch.stack(
            [ref_to_tensor(ref_released_lq(ref_to_uint8(one), upscale, process_size)[0]) for one in image]
        )
    else:
        pixels = _ref_float_prepare(image, upscale, process_size)
    return pixels * 2 - 1, output_size


# ------------------------------------------------------------- finishing (docs/algorithm.md §2.8, §2.9)


def ref_released_finish(
    decoded: torch.Tensor,
    lq: np.ndarray,
    color_fix: str,
    resize_to: tuple[int, int] | None = None,
) -> np.ndarray:
    """The released scripts after the decoder, for one image: 8-bit ``[H, W, 3]`` output.

    ``decoded`` ``[3, H, W]`` is the decoder output clamped to [−1, 1]; ``lq`` the 8-bit network input
    (the colour fix's source).  ``x · 0.5 + 0.5`` (FiDeSR and PiSA-SR also clip it to [0, 1], a no-op
    after the clamp), ``to_pil_image`` (truncation), the colour fix on ``to_tensor`` of both images,
    clamped, ``to_pil_image`` again; then, for pre-enlarged inputs, ``resize`` (bicubic) to ``resize_to``
    (FiDeSR and PiSA-SR; OSEDiff computes that resize and drops it: pass None).
    """
    output = ref_to_pil_array(torch.clip(decoded.float() * 0.5 + 0.5, 0, 1))
    if color_fix in ("adain", "wavelet"):
        target, source = ref_to_tensor(output)[None], ref_to_tensor(lq)[None]
        fixed = ref_adain(target, source) if color_fix == "adain" else ref_wavelet(target, source)
        output = ref_to_pil_array(fixed[0].clamp_(0.0, 1.0))
    if resize_to is not None and tuple(resize_to) != output.shape[:2]:
        output = ref_pil_resize(output, resize_to)
    return output
