"""Classifier score distillation (CSD), as PiSA-SR and the FiDeSR trainer use it (docs/algorithm.md §5).

The restored latent ``z`` is noised at a random ``t ~ U[20, 500)``; a frozen SD 2.1
U-Net predicts the noise once with the caption (positive) embedding and once with
the fixed negative-prompt embedding.  With classifier-free guidance 7.5 the
guided prediction is the "real" score, the negative-prompt prediction the "fake"
one; both are turned into ``x0`` estimates and their difference, scaled by
``mean|z - x0_real|`` per sample, is the direction ``g`` that ``z`` should move
against::

    loss = mean(w · (z − sg(z − g))²)        # value mean(w·g²), gradient 2·w·g / N

The frozen U-Net is the generator's own U-Net with its LoRA adapters switched
off (``frozen_unet(unet)``), so no second copy is needed; its predictions run
under ``torch.no_grad`` and only ``z`` receives gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

import fidesr_core
from fidesr_core.errors import SettingsError
from fidesr_core.networks.text_embedding import batch_prompt_embedding

__all__ = [
    "NEGATIVE_PROMPT",
    "SCHEDULER_CONFIG_DIR",
    "NoisePredictor",
    "ClassifierScoreDistillation",
    "frozen_unet",
    "ddpm_alphas_cumprod",
]

# The released trainer's negative prompt, "oil painting" twice as released.
NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
    "jpeg artifacts, deformed, lowres, over-smooth"
)

SCHEDULER_CONFIG_DIR = Path(fidesr_core.__file__).resolve().parent / "loading" / "configs" / "sd21_base" / "scheduler"

# (noisy latent [N, 4, h, w], timesteps [N], encoder_hidden_states=[N, 77, D]) -> noise, or an output with .sample
NoisePredictor = Callable[..., Any]


def ddpm_alphas_cumprod(scheduler_config: str | Path | Mapping[str, Any] | None = None) -> torch.Tensor:
    """``ᾱ_t`` (float32, ``[num_train_timesteps]``) of a diffusers DDPM scheduler config.

    ``None`` uses SD 2.1-base's config shipped in ``fidesr_core/loading/configs`` (scaled_linear
    0.00085 → 0.012, 1000 steps); a path names a folder or ``scheduler_config.json``.
    """
    if scheduler_config is None:
        scheduler_config = SCHEDULER_CONFIG_DIR
    if isinstance(scheduler_config, Mapping):
        config = dict(scheduler_config)
    else:
        location = Path(scheduler_config)
        if not location.exists():
            raise SettingsError(f"scheduler config {location} does not exist")
        config = DDPMScheduler.load_config(str(location.parent if location.is_file() else location))
    scheduler = DDPMScheduler.from_config(config)
    return scheduler.alphas_cumprod.detach().to(torch.float32).clone()


def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


@contextlib.contextmanager
def frozen_unet(unet: nn.Module) -> Iterator[nn.Module]:
    """Yield ``unet`` with its peft LoRA adapters disabled, then restore them exactly.

    peft's enable/disable toggles ``requires_grad`` of the adapter weights; every
    parameter's flag is put back as it was on exit.  A U-Net without adapters (or with
    them already disabled) is yielded unchanged.
    """
    layers = _tuner_layers(unet)
    enabled = [layer for layer in layers if not layer.disable_adapters]
    if not enabled:
        yield unet
        return
    flags = {name: parameter.requires_grad for name, parameter in unet.named_parameters()}
    for layer in enabled:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in enabled:
            layer.enable_adapters(True)
        for name, parameter in unet.named_parameters():
            parameter.requires_grad_(flags[name])


@contextlib.contextmanager
def _open_predictor(source: NoisePredictor | AbstractContextManager) -> Iterator[NoisePredictor]:
    if hasattr(source, "__enter__") and hasattr(source, "__exit__"):
        with source as predictor:
            if not callable(predictor):
                raise TypeError(
                    f"the CSD predictor context yielded {type(predictor).__name__}, expected a callable noise "
                    "predictor (use training.csd.frozen_unet(unet) for a peft U-Net)"
                )
            yield predictor
    elif callable(source):
        yield source
    else:
        raise TypeError(f"CSD needs a noise predictor or a context manager yielding one, got {type(source).__name__}")


def _noise_of(output: Any) -> torch.Tensor:
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


class ClassifierScoreDistillation(nn.Module):
    """CSD loss on the restored latent (docs/algorithm.md §5, PiSA-SR).

    Args:
        scheduler_config: DDPM config giving ``ᾱ_t`` (default: SD 2.1-base's).
        guidance_scale: classifier-free guidance of the "real" prediction (7.5).
        min_timestep, max_timestep: ``t`` is drawn uniformly from ``[min, max)`` per sample.
    """

    alphas_cumprod: torch.Tensor

    def __init__(
        self,
        scheduler_config: str | Path | Mapping[str, Any] | None = None,
        *,
        guidance_scale: float = 7.5,
        min_timestep: int = 20,
        max_timestep: int = 500,
    ) -> None:
        super().__init__()
        alphas_cumprod = ddpm_alphas_cumprod(scheduler_config)
        if not 0 <= min_timestep < max_timestep <= alphas_cumprod.numel():
            raise SettingsError(
                f"CSD timesteps [{min_timestep}, {max_timestep}) must lie in [0, {alphas_cumprod.numel()}] "
                "and be non-empty"
            )
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.guidance_scale = float(guidance_scale)
        self.min_timestep = int(min_timestep)
        self.max_timestep = int(max_timestep)

    def sample_noise(
        self, latent: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``(timesteps [B] long, noise like latent, float32)``; timesteps first, then noise."""
        device = generator.device if generator is not None else latent.device
        timesteps = torch.randint(
            self.min_timestep, self.max_timestep, (latent.shape[0],), generator=generator, device=device
        )
        noise = torch.randn(latent.shape, generator=generator, device=device, dtype=torch.float32)
        return timesteps.to(latent.device), noise.to(latent.device)

    @torch.no_grad()
    def score_direction(
        self,
        latent: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        predictor: NoisePredictor | AbstractContextManager,
        positive_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """``g = (x0_fake − x0_real) / (mean|z − x0_real| + 1e-6)`` for given ``t`` and noise; no grad."""
        z = latent.detach().float()  # [B, 4, h, w]
        batch = z.shape[0]
        positive = batch_prompt_embedding(positive_embeds, batch, "positive")
        negative = batch_prompt_embedding(negative_embeds, batch, "negative")
        alpha_bar = self.alphas_cumprod.to(z.device)[timesteps.to(z.device)].view(batch, 1, 1, 1)
        noisy = alpha_bar.sqrt() * z + (1.0 - alpha_bar).sqrt() * noise.float()  # DDPM add_noise
        with _open_predictor(predictor) as model:
            model_dtype = getattr(model, "dtype", None)
            dtype = model_dtype if isinstance(model_dtype, torch.dtype) else z.dtype
            eps = _noise_of(
                model(
                    torch.cat([noisy, noisy]).to(dtype),
                    torch.cat([timesteps, timesteps]).to(z.device),
                    encoder_hidden_states=torch.cat([negative, positive]).to(dtype),
                )
            ).float()
        eps_negative, eps_positive = eps.chunk(2)
        eps_guided = eps_negative + self.guidance_scale * (eps_positive - eps_negative)
        x0_real = (noisy - (1.0 - alpha_bar).sqrt() * eps_guided) / alpha_bar.sqrt()
        x0_fake = (noisy - (1.0 - alpha_bar).sqrt() * eps_negative) / alpha_bar.sqrt()
        scale = (z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6
        return (x0_fake - x0_real) / scale

    def forward(
        self,
        latent: torch.Tensor,
        predictor: NoisePredictor | AbstractContextManager,
        positive_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        *,
        weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """CSD loss of ``latent`` ``[B, 4, h, w]`` (the generator output, with grad).

        ``predictor``: a noise predictor called as ``(z_t, t, encoder_hidden_states=...)``
        (a diffusers U-Net works) or a context manager yielding one, e.g.
        ``frozen_unet(unet)``.  ``weights``: DAW weights ``[B, 1, H, W]``, resized
        bilinearly to the latent size (as released); ``None`` means 1.
        """
        timesteps, noise = self.sample_noise(latent, generator)
        direction = self.score_direction(latent, timesteps, noise, predictor, positive_embeds, negative_embeds)
        z = latent.float()
        target = (z - direction).detach()
        squared = (z - target) ** 2  # [B, 4, h, w]
        if weights is None:
            return squared.mean()
        if weights.shape[-2:] != z.shape[-2:]:
            weights = F.interpolate(weights.float(), size=z.shape[-2:], mode="bilinear", align_corners=False)
        return (weights.float() * squared).mean()
