"""VAE encode to scaled latents and decode back to images, tiled when large."""

from __future__ import annotations

import logging

import torch

from ..networks.model import OneStepRestorer
from ..progress import CancelCheck, ProgressCallback
from ..settings import LatentMode
from ..tiled_vae.budget import MemoryBudget

logger = logging.getLogger(__name__)


def latent_noise(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``seed``: identical on every device and tiling."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def vae_device(model: OneStepRestorer) -> torch.device:
    """Where the VAE's weights are (its compute device unless a caller says otherwise)."""
    return next(model.vae.parameters()).device


def encode_image(
    model: OneStepRestorer,
    pixels: torch.Tensor,
    *,
    latent_mode: LatentMode = "sample",
    seed: int = 0,
    tile_size: int = 1024,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    device: torch.device | None = None,
    budget: MemoryBudget | None = None,
) -> torch.Tensor:
    """``z_L = SF · latent`` of ``pixels`` ``[B, 3, H, W]`` in [-1, 1] -> ``[B, 4, H/8, W/8]`` float32.

    ``"sample"`` draws with noise seeded by ``seed`` (the released code samples unseeded), the same for every
    image, so each gets the result of encoding it alone; ``"mode"`` takes the mean.  ``device`` defaults to
    the VAE weights'.
    """
    from ..tiled_vae.codec import encode_moments  # it needs diffusers: imported once a model exists, not at start-up

    vae_input = pixels.to(device=device or vae_device(model), dtype=model.dtype)
    moments = encode_moments(
        model.vae, vae_input, tile_size=tile_size, progress=progress, should_cancel=should_cancel, budget=budget
    ).float()
    mean, log_variance = moments.chunk(2, dim=1)
    latent = mean
    if latent_mode == "sample":
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
        latent = mean + std * latent_noise((1, *mean.shape[1:]), seed).to(mean.device)
    return latent * model.scaling_factor


def decode_latent(
    model: OneStepRestorer,
    latent: torch.Tensor,
    *,
    tile_size: int = 224,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    device: torch.device | None = None,
    budget: MemoryBudget | None = None,
) -> torch.Tensor:
    """Scaled latent ``[B, 4, h, w]`` -> image ``[B, 3, 8h, 8w]`` in [0, 1], float32; a half-precision decode
    that overflows is redone in float32 (with a warning)."""
    from ..tiled_vae.codec import decode_latents  # see encode_image

    device = device or vae_device(model)
    unscaled = latent.float() / model.scaling_factor
    decoded = decode_latents(
        model.vae,
        unscaled.to(device=device, dtype=model.dtype),
        tile_size=tile_size,
        progress=progress,
        should_cancel=should_cancel,
        budget=budget,
    )
    if model.dtype != torch.float32 and not torch.isfinite(decoded).all():
        logger.warning("VAE decode overflowed in %s; decoding again in float32", model.dtype)
        model.vae.float()
        try:
            decoded = decode_latents(
                model.vae, unscaled.to(device), tile_size=tile_size, should_cancel=should_cancel, budget=budget
            )
        finally:
            model.vae.to(model.dtype)
    return decoded.float().clamp_(-1.0, 1.0).add_(1.0).mul_(0.5)  # in place: the decode's own tensor
