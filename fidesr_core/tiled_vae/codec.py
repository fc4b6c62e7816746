"""Tiled VAE encode/decode: memory bounded by one tile at any image size, and no seams.

The method is docs/algorithm.md §2.10. This module holds the entry points; ``program`` reads the
diffusers VAE into a flat list of the steps in ``layers``, which ``runner`` runs segment by segment
with ``group_norm``'s whole-image statistics and ``maps``' whole-image maps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL

from ..errors import BaseModelError, ImageInputError, SettingsError
from ..progress import CancelCheck, ProgressCallback, check_cancelled
from .budget import MemoryBudget
from .program import Program, decoder_program, encoder_program
from .runner import map_channels, map_sizes, run_program


def _check_no_autograd(tensor: torch.Tensor) -> None:
    if torch.is_grad_enabled() and tensor.requires_grad:
        raise SettingsError("the tiled VAE runs without autograd; use tile_size=0 to back-propagate through the VAE")


def _fits_one_tile(height: int, width: int, tile_size: int) -> bool:
    return tile_size == 0 or (height <= tile_size and width <= tile_size)


def _stock_fits(build: Callable[[], Program], source: torch.Tensor, budget: MemoryBudget) -> bool:
    """True when the untiled path's widest activation fits ``budget.stock_bytes`` (or the VAE cannot be tiled)."""
    try:
        program = build()
    except BaseModelError:
        return True  # not tileable: the stock path is the only one
    sizes, _ = map_sizes(program.steps, tuple(source.shape[-2:]))
    channels, _ = map_channels(program.steps, source.shape[1])
    widest = max(c * h * w for c, (h, w) in zip(channels, sizes, strict=True))
    return widest * source.shape[0] * source.element_size() <= budget.stock_bytes


def _run_untiled(
    run: Callable[[], torch.Tensor], progress: ProgressCallback | None, should_cancel: CancelCheck | None
) -> torch.Tensor:
    """The stock diffusers path, reported as one step."""
    check_cancelled(should_cancel)
    result = run()
    if progress is not None:
        progress(1, 1)
    return result


def encode_moments(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    *,
    tile_size: int = 1024,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    budget: MemoryBudget | None = None,
) -> torch.Tensor:
    """``quant_conv(encoder(pixels))``: ``[B, 2·latent_channels, H/8, W/8]`` (mean and log-variance halves).

    ``pixels`` [B, 3, H, W] in [-1, 1], H and W multiples of 8, in the VAE's
    dtype and device. ``tile_size`` is the largest tile core in pixels
    (rounded down to a multiple of 8); 0 never tiles (the stock path, whatever
    its memory). An image within one tile whose untiled activations fit
    ``budget.stock_bytes`` gives exactly ``vae.encode(pixels).latent_dist.parameters``.
    """
    budget = budget or MemoryBudget()
    channels = vae.config.in_channels
    if pixels.dim() != 4 or pixels.shape[1] != channels or pixels.shape[-2] % 8 or pixels.shape[-1] % 8:
        raise ImageInputError(
            f"VAE encode needs pixels [B, {channels}, H, W] with H, W multiples of 8, got {tuple(pixels.shape)}"
        )
    height, width = pixels.shape[-2:]
    if tile_size == 0 or (
        _fits_one_tile(height, width, tile_size) and _stock_fits(lambda: encoder_program(vae), pixels, budget)
    ):
        return _run_untiled(lambda: vae.encode(pixels).latent_dist.parameters, progress, should_cancel)
    program = encoder_program(vae)
    latent_height = map_sizes(program.steps, (height, width))[0][-1][0]
    factor = height // latent_height
    if factor * latent_height != height or tile_size < factor:
        raise SettingsError(
            f"tiled VAE encode: {height}x{width} px or tile_size {tile_size} do not fit the ×{factor} VAE"
        )
    _check_no_autograd(pixels)
    with torch.no_grad():
        return run_program(program, pixels, tile_size // factor, progress, should_cancel, budget)


def decode_latents(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    *,
    tile_size: int = 224,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    budget: MemoryBudget | None = None,
) -> torch.Tensor:
    """``decoder(post_quant_conv(latents))``: ``[B, 3, 8h, 8w]``, not clamped.

    ``latents`` [B, latent_channels, h, w] unscaled (already divided by the
    scaling factor), in the VAE's dtype and device. ``tile_size`` is the
    largest tile core in latent pixels; 0 never tiles. Latents within one tile
    whose untiled activations fit ``budget.stock_bytes`` give exactly
    ``vae.decode(latents).sample``; larger ones within one tile are run tiled
    with one attention tile, equal to it up to float rounding.
    """
    budget = budget or MemoryBudget()
    channels = vae.config.latent_channels
    if latents.dim() != 4 or latents.shape[1] != channels:
        raise ImageInputError(f"VAE decode needs latents [B, {channels}, h, w], got {tuple(latents.shape)}")
    height, width = latents.shape[-2:]
    if tile_size == 0 or (
        _fits_one_tile(height, width, tile_size) and _stock_fits(lambda: decoder_program(vae), latents, budget)
    ):
        return _run_untiled(lambda: vae.decode(latents).sample, progress, should_cancel)
    program = decoder_program(vae)
    _check_no_autograd(latents)
    with torch.no_grad():
        return run_program(program, latents, tile_size, progress, should_cancel, budget)
