"""FiDeSR training losses: DAW weights, weighted L2 / LPIPS and the combined loss (docs/algorithm.md §5).

``L = 1·L2 + 2·LPIPS + 1·CSD``, each term weighted by the difficulty-aware
weighting (DAW) map ``w*`` once DAW is on (after 2000 steps, ramped over 1000):

    D  = detail map of the HQ target on its [-1, 1] values (no shift to [0, 1])
    E  = pnorm((1 − p)·(0.8·mean_c|x̂ − x_H| + 0.2·std_c|x̂ − x_H|) + p·LPIPS_map)
    W  = D·E;   Wb = box3(W) / (mean(box3(W)) + 1e-6)
    w  = 1 + α·w_max·tanh(Wb / w_max);   w* = w / mean(w)        (per image)

``p`` is the perceptual share of the error map (``perceptual_mix``, the released
trainer's ``daw_wperc``: 0 = pixel error only, 1 = LPIPS only; 0.5 as released).
The weights are targets of the weighting, not of the optimisation: no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from fidesr_core.errors import SettingsError
from fidesr_core.ops.detail_map import box_blur3, detail_map, percentile_normalize

from .csd import ClassifierScoreDistillation, NoisePredictor

__all__ = [
    "daw_alpha",
    "pixel_error_map",
    "daw_error_map",
    "daw_weights",
    "resize_weights",
    "WeightedL2Loss",
    "WeightedLPIPSLoss",
    "FiDeSRLoss",
]


def daw_alpha(step: int, *, start: int = 2000, ramp: int = 1000, alpha: float = 0.6) -> float:
    """DAW strength at ``step``: 0 before ``start``, then linear to ``alpha`` over ``ramp`` steps."""
    if step < start:
        return 0.0
    if ramp <= 0:
        return float(alpha)
    return float(alpha) * min(step - start, ramp) / ramp


def pixel_error_map(sr: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
    """``0.8·mean_c|sr − hq| + 0.2·std_c|sr − hq|`` (unbiased std over channels) -> ``[B, 1, H, W]``."""
    error = (sr.float() - hq.float()).abs()
    return 0.8 * error.mean(dim=1, keepdim=True) + 0.2 * error.std(dim=1, keepdim=True)


def _lpips_at_image_size(lpips_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if lpips_map.shape[-2:] == size:
        return lpips_map.float()
    if lpips_map.shape[-2:] == (1, 1):  # a non-spatial LPIPS value per image
        return lpips_map.float().expand(-1, -1, *size)
    return F.interpolate(lpips_map.float(), size=size, mode="bilinear", align_corners=False)


def daw_error_map(
    sr: torch.Tensor, hq: torch.Tensor, lpips_map: torch.Tensor, *, perceptual_mix: float = 0.5
) -> torch.Tensor:
    """Error map ``E`` in ``[0, 1]``: pnorm of the pixel / LPIPS mix -> ``[B, 1, H, W]``."""
    lpips_full = _lpips_at_image_size(lpips_map.detach(), tuple(hq.shape[-2:]))
    mixed = (1.0 - perceptual_mix) * pixel_error_map(sr.detach(), hq) + perceptual_mix * lpips_full
    return percentile_normalize(mixed)


def _check_images(sr: torch.Tensor, hq: torch.Tensor) -> None:
    if sr.shape != hq.shape or sr.dim() != 4:
        raise ValueError(f"expected two [B, C, H, W] images of one shape, got {tuple(sr.shape)} and {tuple(hq.shape)}")


@torch.no_grad()
def daw_weights(
    sr: torch.Tensor,
    hq: torch.Tensor,
    lpips_map: torch.Tensor,
    *,
    alpha: float = 0.6,
    w_max: float = 2.0,
    perceptual_mix: float = 0.5,
) -> torch.Tensor:
    """DAW weights ``w*`` ``[B, 1, H, W]`` (float32, mean 1 per image) for ``sr``, ``hq`` ``[B, 3, H, W]`` in [-1, 1].

    ``lpips_map``: spatial LPIPS ``[B, 1, h, w]`` (resized bilinearly to the image if smaller).
    """
    _check_images(sr, hq)
    if w_max <= 0:
        raise SettingsError(f"DAW w_max must be > 0, got {w_max}")
    if not 0.0 <= perceptual_mix <= 1.0:
        raise SettingsError(f"DAW perceptual_mix must lie in [0, 1], got {perceptual_mix}")
    if lpips_map.dim() != 4 or lpips_map.shape[:2] != (sr.shape[0], 1):
        raise ValueError(f"lpips_map must be [{sr.shape[0]}, 1, h, w], got {tuple(lpips_map.shape)}")
    detail = detail_map(hq, shift_to_unit=False)  # [B, 1, H, W]
    error = daw_error_map(sr, hq, lpips_map, perceptual_mix=perceptual_mix)
    blurred = box_blur3(detail * error)
    relative = blurred / (blurred.mean(dim=(2, 3), keepdim=True) + 1e-6)
    weights = 1.0 + alpha * w_max * torch.tanh(relative / w_max)
    return weights / weights.mean(dim=(2, 3), keepdim=True)


def resize_weights(weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Weights ``[B, 1, H, W]`` at ``size``: bilinear (align_corners=False, as released), a 1x1 target takes the mean."""
    if tuple(weights.shape[-2:]) == tuple(size):
        return weights
    if tuple(size) == (1, 1):
        return weights.mean(dim=(2, 3), keepdim=True)
    return F.interpolate(weights, size=size, mode="bilinear", align_corners=False)


class WeightedL2Loss(nn.Module):
    """``mean(w*·(x̂ − x_H)²)`` over all pixels and channels; ``weights=None`` is the plain MSE."""

    def forward(self, sr: torch.Tensor, hq: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        _check_images(sr, hq)
        squared = (sr.float() - hq.float()) ** 2  # [B, 3, H, W]
        if weights is None:
            return squared.mean()
        if weights.shape != (sr.shape[0], 1, *sr.shape[-2:]):
            raise ValueError(
                f"L2 weights must be [{sr.shape[0]}, 1, {sr.shape[2]}, {sr.shape[3]}], got {tuple(weights.shape)}"
            )
        return (weights.float() * squared).mean()


class WeightedLPIPSLoss(nn.Module):
    """``mean(resize(w*)·LPIPS_map)``; ``weights=None`` is the plain mean of the map."""

    def forward(self, lpips_map: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            return lpips_map.float().mean()
        if weights.dim() != 4 or weights.shape[:2] != (lpips_map.shape[0], 1):
            raise ValueError(f"LPIPS weights must be [{lpips_map.shape[0]}, 1, H, W], got {tuple(weights.shape)}")
        resized = resize_weights(weights.float(), tuple(lpips_map.shape[-2:]))
        return (resized * lpips_map.float()).mean()


class FiDeSRLoss(nn.Module):
    """The released objective ``λ_l2·L2 + λ_lpips·LPIPS + λ_csd·CSD`` with DAW weighting.

    Args:
        lpips_net: spatial LPIPS, ``(x̂, x_H) -> [B, 1, H, W]`` (e.g. ``LPIPSNet``).
        csd: the CSD term (default: SD 2.1 schedule, CFG 7.5, t in [20, 500)); unused when ``lambda_csd == 0``.
        daw_start, daw_ramp, daw_alpha_max: the DAW schedule (``daw_alpha``).
        daw_w_max, perceptual_mix: DAW soft clip and error-map mix (``daw_weights``).

    ``forward`` returns ``(total, terms)``; ``terms`` holds detached 0-dim float tensors
    ``total``, ``l2``, ``lpips``, ``csd`` (each before its λ), ``daw_alpha``,
    ``daw_weight_max`` and ``daw_weight_min``, for logging by name.
    """

    def __init__(
        self,
        lpips_net: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        csd: ClassifierScoreDistillation | None = None,
        *,
        lambda_l2: float = 1.0,
        lambda_lpips: float = 2.0,
        lambda_csd: float = 1.0,
        daw_start: int = 2000,
        daw_ramp: int = 1000,
        daw_alpha_max: float = 0.6,
        daw_w_max: float = 2.0,
        perceptual_mix: float = 0.5,
    ) -> None:
        super().__init__()
        self.lpips_net = lpips_net
        self.csd = csd if csd is not None or lambda_csd == 0 else ClassifierScoreDistillation()
        self.l2_loss = WeightedL2Loss()
        self.lpips_loss = WeightedLPIPSLoss()
        self.lambda_l2 = float(lambda_l2)
        self.lambda_lpips = float(lambda_lpips)
        self.lambda_csd = float(lambda_csd)
        self.daw_start = int(daw_start)
        self.daw_ramp = int(daw_ramp)
        self.daw_alpha_max = float(daw_alpha_max)
        self.daw_w_max = float(daw_w_max)
        self.perceptual_mix = float(perceptual_mix)

    def daw_alpha(self, step: int) -> float:
        return daw_alpha(step, start=self.daw_start, ramp=self.daw_ramp, alpha=self.daw_alpha_max)

    def forward(
        self,
        sr: torch.Tensor,
        hq: torch.Tensor,
        latent: torch.Tensor | None = None,
        *,
        step: int,
        predictor: NoisePredictor | AbstractContextManager | None = None,
        positive_embeds: torch.Tensor | None = None,
        negative_embeds: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the generator output ``sr`` ``[B, 3, H, W]`` against ``hq`` and of its latent ``[B, 4, h, w]``.

        The CSD arguments (see ``ClassifierScoreDistillation.forward``) are needed unless ``lambda_csd == 0``.
        """
        _check_images(sr, hq)
        lpips_map = self.lpips_net(sr, hq)  # [B, 1, H, W], with grad into sr
        alpha = self.daw_alpha(step)
        weights = None
        if alpha > 0:
            weights = daw_weights(
                sr, hq, lpips_map.detach(), alpha=alpha, w_max=self.daw_w_max, perceptual_mix=self.perceptual_mix
            )
        l2 = self.l2_loss(sr, hq, weights)
        lpips_term = self.lpips_loss(lpips_map, weights)
        total = self.lambda_l2 * l2 + self.lambda_lpips * lpips_term
        csd = torch.zeros((), device=sr.device)
        if self.lambda_csd != 0:
            if latent is None or predictor is None or positive_embeds is None or negative_embeds is None:
                raise SettingsError(
                    "FiDeSRLoss with lambda_csd != 0 needs latent, predictor, positive_embeds and negative_embeds"
                )
            csd = self.csd(latent, predictor, positive_embeds, negative_embeds, weights=weights, generator=generator)
            total = total + self.lambda_csd * csd
        one = torch.ones((), device=sr.device)
        terms = {
            "total": total.detach(),
            "l2": l2.detach(),
            "lpips": lpips_term.detach(),
            "csd": csd.detach(),
            "daw_alpha": torch.tensor(alpha, device=sr.device),
            "daw_weight_max": weights.max().detach() if weights is not None else one,
            "daw_weight_min": weights.min().detach() if weights is not None else one,
        }
        return total, terms
