"""Butterworth low/high-pass filters on latents via ``rfft2``, in float32 (docs/algorithm.md §4).

``"official"`` reproduces the released code's orientation-selective radius (the rows of the upper half are not
wrapped to negative frequencies; the released weights were tuned with it); ``"radial"`` is rotation-symmetric.
"""

from __future__ import annotations

import torch

from ..settings import FilterGeometry


def frequency_radius(
    height: int, width: int, *, geometry: FilterGeometry = "official", device: torch.device | None = None
) -> torch.Tensor:
    """Normalised radius ``ρ ∈ [0, 1]`` of every ``rfft2`` bin, shape ``[H, W//2 + 1]``."""
    if geometry == "official":
        # The released code divides by the last index (H - 1, W // 2) without wrapping.
        ky = torch.arange(height, device=device, dtype=torch.float32) / max(height - 1, 1)
        kx = torch.arange(width // 2 + 1, device=device, dtype=torch.float32) / max(width // 2, 1)
    else:
        ky = torch.fft.fftfreq(height, device=device).abs().to(torch.float32) * 2.0
        kx = torch.fft.rfftfreq(width, device=device).to(torch.float32) * 2.0
    radius = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    return radius / torch.clamp(radius.max(), min=1.0)


def butterworth_lowpass_mask(
    height: int,
    width: int,
    *,
    cutoff: float,
    order: int,
    geometry: FilterGeometry = "official",
    device: torch.device | None = None,
) -> torch.Tensor:
    """``1 / (1 + (ρ / cutoff)^(2·order))`` on the ``rfft2`` grid, shape ``[H, W//2 + 1]``."""
    radius = frequency_radius(height, width, geometry=geometry, device=device)
    return 1.0 / (1.0 + (radius / cutoff) ** (2 * order))


def _apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    height, width = x.shape[-2:]
    spectrum = torch.fft.rfft2(x.float())
    return torch.fft.irfft2(spectrum * mask, s=(height, width))


def butterworth_lowpass(
    x: torch.Tensor, *, cutoff: float, order: int = 2, geometry: FilterGeometry = "official"
) -> torch.Tensor:
    """Low-pass each ``[.., H, W]`` plane of ``x``; returns float32."""
    height, width = x.shape[-2:]
    mask = butterworth_lowpass_mask(height, width, cutoff=cutoff, order=order, geometry=geometry, device=x.device)
    return _apply_mask(x, mask)


def butterworth_highpass(
    x: torch.Tensor, *, cutoff: float, order: int = 2, geometry: FilterGeometry = "official"
) -> torch.Tensor:
    """High-pass with mask ``1 - lowpass`` applied in the spectrum (as released); float32."""
    height, width = x.shape[-2:]
    mask = butterworth_lowpass_mask(height, width, cutoff=cutoff, order=order, geometry=geometry, device=x.device)
    return _apply_mask(x, 1.0 - mask)
