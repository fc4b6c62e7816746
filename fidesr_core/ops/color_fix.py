"""Colour correction of the restored image towards the upscaled input (docs/algorithm.md §2.9).

``adain`` matches per-channel mean and std; ``wavelet`` takes the reference's low frequencies (5 levels of
dilated 3x3 binomial blurs), as PiSA-SR and StableSR do.  Images ``[B, 3, H, W]`` in ``[0, 1]``, clamped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..settings import ColorFixMethod

_WAVELET_LEVELS = 5


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)  # [B, C, H·W]
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]  # unbiased variance, as released
    return mean, std


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Give ``image`` the per-channel mean and std of ``reference`` (same batch and channels)."""
    image, reference = image.float(), reference.float()
    image_mean, image_std = _mean_std(image)
    reference_mean, reference_std = _mean_std(reference)
    # in place on one new map, in the same order of operations (a 4096² image is 200 MB a copy)
    return torch.sub(image, image_mean).div_(image_std).mul_(reference_std).add_(reference_mean).clamp_(0.0, 1.0)


def _binomial_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=x.device) / 16.0
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=channels, dilation=dilation)


def _low_frequency(x: torch.Tensor) -> torch.Tensor:
    """The residue after removing ``_WAVELET_LEVELS`` wavelet detail bands."""
    for level in range(_WAVELET_LEVELS):
        x = _binomial_blur(x, 2**level)
    return x


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Output's high-frequency bands plus the reference's low-frequency residue."""
    image, reference = image.float(), reference.float()
    # The sum of the detail bands telescopes to image - low_frequency(image).
    high = torch.sub(image, _low_frequency(image))
    return high.add_(_low_frequency(reference)).clamp_(0.0, 1.0)


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, method: ColorFixMethod) -> torch.Tensor:
    """Dispatch on ``method``; ``reference`` must already have ``image``'s size."""
    if method == "none":
        return image.float()
    return {"adain": adain_color_fix, "wavelet": wavelet_color_fix}[method](image, reference)
