"""The stages of the Real-ESRGAN degradation (``training.degradation``), batched in torch.

Per-image kernel convolution, random resizing, Gaussian/Poisson noise (grey or colour) and
the JPEG round trip.  Every random draw comes from a :class:`~training.blur_kernels.RandomStream`
so the chain that composes these stages is reproducible.  Images are ``[B, C, H, W]`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import jpeg_codec_differentiable

from .blur_kernels import RandomStream

__all__ = [
    "RESIZE_MODES",
    "Range",
    "add_random_noise",
    "apply_kernels",
    "distinct_level_counts",
    "jpeg_round_trip",
    "poisson_residual",
    "random_resize",
    "resize_images",
]

RESIZE_MODES = ("area", "bilinear", "bicubic")
Range = tuple[float, float]


def apply_kernels(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image ``[B, C, H, W]`` with its own kernel ``[B, k, k]`` (reflect padding, same size).

    The kernels are point-symmetric, so correlation (what ``conv2d`` does) equals convolution.
    """
    batch, channels, height, width = images.shape
    pad = kernels.shape[-1] // 2
    # reflect needs pad < side; tiny intermediate images fall back to edge replication
    mode = "reflect" if pad < height and pad < width else "replicate"
    padded = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(images.dtype).repeat_interleave(channels, dim=0).unsqueeze(1)  # [B*C, 1, k, k]
    return F.conv2d(padded, weight, groups=batch * channels).view(batch, channels, height, width)


def resize_images(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize to ``size`` ``(h, w)`` with ``mode`` (one of :data:`RESIZE_MODES`; no corner alignment)."""
    if mode == "area":
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode=mode, align_corners=False)


def random_resize(
    images: torch.Tensor,
    rng: RandomStream,
    *,
    probs: Sequence[float],
    scale_range: Range,
    base_size: tuple[float, float],
    modes: Sequence[str],
) -> torch.Tensor:
    """Resize to ``base_size · scale`` with scale up (U[1, hi]), down (U[lo, 1]) or kept (1), random mode."""
    direction = rng.pick(probs)  # 0 up, 1 down, 2 keep
    fraction = float(rng.uniform(1).item())
    low, high = scale_range
    scale = (1 + fraction * (high - 1), low + fraction * (1 - low), 1.0)[direction]
    mode = modes[rng.pick([1 / len(modes)] * len(modes))]
    size = (max(1, int(base_size[0] * scale)), max(1, int(base_size[1] * scale)))
    return resize_images(images, size, mode)


def distinct_level_counts(levels: torch.Tensor) -> torch.Tensor:
    """``[B]`` number of distinct 8-bit values in each image of ``levels`` ``[B, ...]`` (integers 0..255)."""
    flat = levels.reshape(levels.shape[0], -1).long()
    histogram = torch.zeros(flat.shape[0], 256, device=flat.device)
    histogram.scatter_add_(1, flat, torch.ones_like(flat, dtype=histogram.dtype))
    return (histogram > 0).sum(dim=1)


def poisson_residual(images: torch.Tensor, rng: RandomStream) -> torch.Tensor:
    """Shot-noise residual of the 8-bit version of ``images``, with the photon count set by its number of levels."""
    levels = torch.clamp((images * 255).round(), 0, 255)
    quantized = levels / 255
    # photons per unit intensity: the next power of two above the number of distinct values
    photons = 2.0 ** torch.ceil(torch.log2(distinct_level_counts(levels).float()))
    photons = photons.view(-1, *([1] * (images.ndim - 1)))
    return rng.poisson(quantized * photons) / photons - quantized


def add_random_noise(
    images: torch.Tensor,
    rng: RandomStream,
    *,
    gaussian_prob: float,
    sigma_range: Range,
    poisson_range: Range,
    gray_prob: float,
) -> torch.Tensor:
    """Per image: Gaussian noise (σ/255) with probability ``gaussian_prob``, else scaled Poisson noise."""
    batch, channels, height, width = images.shape
    per_image = (batch, 1, 1, 1)
    use_gaussian = (rng.uniform(batch) < gaussian_prob).view(per_image)
    gray = (rng.uniform(batch) < gray_prob).to(images.dtype).view(per_image)

    sigma = (rng.uniform(batch, *sigma_range) / 255).view(per_image)
    colour_normal = rng.normal((batch, channels, height, width)).to(images.dtype)
    gray_normal = rng.normal((batch, 1, height, width)).to(images.dtype)
    gaussian = sigma * (gray * gray_normal + (1 - gray) * colour_normal)

    poisson_scale = rng.uniform(batch, *poisson_range).view(per_image)
    colour_shot = poisson_residual(images, rng)
    gray_shot = poisson_residual(rgb_to_grayscale(images.clamp(0, 1)), rng)  # [B, 1, H, W]
    poisson = poisson_scale * (gray * gray_shot + (1 - gray) * colour_shot)

    return torch.clamp(images + torch.where(use_gaussian, gaussian, poisson), 0, 1)


def jpeg_round_trip(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG round trip with one quality per image (kornia's differentiable codec)."""
    return jpeg_codec_differentiable(images.clamp(0, 1), quality).clamp(0, 1)
