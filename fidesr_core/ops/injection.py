"""Training-free latent frequency injection, LF and HF branches, in float32 (docs/algorithm.md §4).

Each branch computes a delta from ``z = z_L − r̃`` and ``z_L`` alone, so the two commute.  Strengths are
effective: the released 50/50 merge of ``--lf_scale 0.2 --hf_scale 0.2`` is LF 0.1 + HF 0.1 here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..settings import FilterGeometry, HighFrequencySettings, LowFrequencySettings
from .detail_map import detail_map, percentile_normalize
from .frequency import butterworth_highpass, butterworth_lowpass


def spatial_gate(upscaled_lq: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """``M_sp``: detail map of the upscaled LQ ``[B, 3, H, W]`` (in [-1, 1]) at latent size ``[B, 1, h, w]``."""
    detail = detail_map(upscaled_lq)
    gate = F.interpolate(detail, size=latent_size, mode="bilinear", align_corners=False)
    return gate.clamp(0.0, 1.0)


def channel_gate(
    z_lq: torch.Tensor,
    *,
    cutoff: float,
    order: int,
    tau: float,
    sharpness: float,
    geometry: FilterGeometry = "official",
) -> torch.Tensor:
    """``M_ch`` ``[B, C, 1, 1]``: how low-frequency each channel of ``z_L`` is, squashed by a sigmoid."""
    z_lq = z_lq.float()
    low = butterworth_lowpass(z_lq, cutoff=cutoff, order=order, geometry=geometry)
    low_norm = torch.linalg.vector_norm(low, dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    full_norm = torch.linalg.vector_norm(z_lq, dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    ratio = (low_norm / full_norm).clamp(0.0, 1.0)
    return torch.sigmoid(sharpness * (ratio - tau))


def _branch_channel_gate(
    z_lq: torch.Tensor, branch: LowFrequencySettings | HighFrequencySettings, cutoff: float, order: int
) -> torch.Tensor:
    """``channel_gate`` with the branch's tau, sharpness and filter at ``cutoff``, ``order`` (HF: its channel_*)."""
    tau, sharpness = branch.channel_tau, branch.channel_sharpness
    return channel_gate(z_lq, cutoff=cutoff, order=order, tau=tau, sharpness=sharpness, geometry=branch.filter)


def residual_magnitude_map(refined_residual: torch.Tensor) -> torch.Tensor:
    """``R = pnorm(0.8·mean_c|r̃| + 0.2·std_c|r̃|)`` ``[B, 1, h, w]`` (unbiased std over channels)."""
    magnitude = refined_residual.float().abs()
    mixed = 0.8 * magnitude.mean(dim=1, keepdim=True) + 0.2 * magnitude.std(dim=1, keepdim=True)
    return percentile_normalize(mixed)


def low_frequency_delta(
    z: torch.Tensor, z_lq: torch.Tensor, gate: torch.Tensor, settings: LowFrequencySettings
) -> torch.Tensor:
    """``s_lf · M · M_ch · LPF(z)``: what the LF branch adds to the refined latent ``z``."""
    z, z_lq = z.float(), z_lq.float()
    if settings.strength == 0:
        return torch.zeros_like(z)
    low = butterworth_lowpass(z, cutoff=settings.cutoff, order=settings.order, geometry=settings.filter)
    residual_map = residual_magnitude_map(z_lq - z)
    mask = percentile_normalize((1.0 - gate.float()) * residual_map) ** settings.gamma
    per_channel = _branch_channel_gate(z_lq, settings, settings.cutoff, settings.order)
    return settings.strength * mask * per_channel * low


def high_frequency_delta(
    z: torch.Tensor, z_lq: torch.Tensor, gate: torch.Tensor, settings: HighFrequencySettings
) -> torch.Tensor:
    """``s_hf · M_sp^γ · (1 − M_ch) · (HPF(z) − HPF(z_L))``: what the HF branch adds to ``z``."""
    z, z_lq = z.float(), z_lq.float()
    if settings.strength == 0:
        return torch.zeros_like(z)
    kwargs = {"cutoff": settings.cutoff, "order": settings.order, "geometry": settings.filter}
    detail_gap = butterworth_highpass(z, **kwargs) - butterworth_highpass(z_lq, **kwargs)
    per_channel = _branch_channel_gate(z_lq, settings, settings.channel_cutoff, settings.channel_order)
    return settings.strength * gate.float() ** settings.gamma * (1.0 - per_channel) * detail_gap


def inject_frequencies(
    z: torch.Tensor,
    z_lq: torch.Tensor,
    gate: torch.Tensor,
    low: LowFrequencySettings,
    high: HighFrequencySettings,
) -> torch.Tensor:
    """Refined latent plus both deltas (float32); strengths of 0 switch a branch off."""
    return z.float() + low_frequency_delta(z, z_lq, gate, low) + high_frequency_delta(z, z_lq, gate, high)
