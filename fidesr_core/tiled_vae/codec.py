"""Tiled VAE encode/decode, memory bounded by one tile at any image size, no seams (docs/algorithm.md §2.10):
the entry points; ``program`` reads the VAE into ``layers``' steps, which ``runner`` runs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL

from ..errors import BaseModelError, ImageInputError, SettingsError
from ..progress import CancelCheck, ProgressCallback, check_cancelled
from .budget import MemoryBudget
from .maps import MapStore
from .program import Program, decoder_program, encoder_program
from .runner import map_shapes, run_program


def _tiled_program(
    build: Callable[[], Program], source: torch.Tensor, tile_size: int, budget: MemoryBudget
) -> Program | None:
    """The program to run ``source`` in tiles, or ``None`` for the stock path: ``tile_size`` 0, or ``source`` within
    one tile with the stock path's widest activation under ``budget.stock_bytes`` (or a VAE that cannot be tiled)."""
    if tile_size == 0:
        return None
    one_tile = source.shape[-2] <= tile_size and source.shape[-1] <= tile_size
    try:
        program = build()
    except BaseModelError:
        if one_tile:
            return None  # not tileable: the stock path is the only one
        raise
    if one_tile:
        shapes, _ = map_shapes(program.steps, source.shape[1], tuple(source.shape[-2:]))
        widest = max(c * h * w for c, (h, w) in shapes)
        if widest * source.shape[0] * source.element_size() <= budget.stock_bytes:
            return None
    if torch.is_grad_enabled() and source.requires_grad:
        raise SettingsError("the tiled VAE runs without autograd; use tile_size=0 to back-propagate through the VAE")
    return program


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

    ``pixels`` [B, 3, H, W] in [-1, 1], H and W multiples of 8, in the VAE's dtype and device.  ``tile_size``:
    the largest tile core in pixels (rounded down to a multiple of 8; 0 never tiles).  An image within one tile
    whose untiled activations fit ``budget.stock_bytes`` gives exactly ``vae.encode(pixels)``'s moments.
    """
    budget = budget or MemoryBudget()
    channels = vae.config.in_channels
    if pixels.dim() != 4 or pixels.shape[1] != channels or pixels.shape[-2] % 8 or pixels.shape[-1] % 8:
        raise ImageInputError(
            f"VAE encode needs pixels [B, {channels}, H, W] with H, W multiples of 8, got {tuple(pixels.shape)}"
        )
    program = _tiled_program(lambda: encoder_program(vae), pixels, tile_size, budget)
    if program is None:
        return _run_untiled(lambda: vae.encode(pixels).latent_dist.parameters, progress, should_cancel)
    height, width = pixels.shape[-2:]
    _, (latent_height, _) = map_shapes(program.steps, channels, (height, width))[0][-1]
    factor = height // latent_height
    if factor * latent_height != height or tile_size < factor:
        raise SettingsError(
            f"tiled VAE encode: {height}x{width} px or tile_size {tile_size} do not fit the ×{factor} VAE"
        )
    return run_program(
        program, pixels, tile_size // factor, progress, should_cancel, MapStore(budget, pixels.device, program.layout())
    )


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

    ``latents`` [B, latent_channels, h, w] unscaled, in the VAE's dtype and device; ``tile_size`` in latent
    pixels, as ``encode_moments``'s.  Larger latents within one tile run tiled with one attention tile, equal
    to ``vae.decode(latents).sample`` up to float rounding.
    """
    budget = budget or MemoryBudget()
    channels = vae.config.latent_channels
    if latents.dim() != 4 or latents.shape[1] != channels:
        raise ImageInputError(f"VAE decode needs latents [B, {channels}, h, w], got {tuple(latents.shape)}")
    program = _tiled_program(lambda: decoder_program(vae), latents, tile_size, budget)
    if program is None:
        return _run_untiled(lambda: vae.decode(latents).sample, progress, should_cancel)
    return run_program(
        program, latents, tile_size, progress, should_cancel, MapStore(budget, latents.device, program.layout())
    )
