"""Tiled VAE encode/decode: accelerator memory bounded by one tile at any image size, and no seams.

An input that fits in one tile goes through the stock diffusers path unchanged.
A larger one is cut into a grid of tiles whose *cores* partition the latent
(and, scaled by 2, 4 and 8, every feature map of the encoder or decoder). The
network is flattened into primitive steps (convolution, GroupNorm, activation,
residual save/add, nearest ×2 upsampling, mid-block attention), read from the
diffusers module structure, and cut into *segments* at every GroupNorm. Each
segment runs tile after tile:

* a tile reads, from the whole-image maps the previous segment left, its core
  plus the halo its convolutions need. The halo is derived exactly by walking
  the segment backwards through each conv's kernel, stride and padding
  (Downsample2D's one-sided padding included); cores sit on the 8-pixel grid,
  so strided convs sample the same grid as untiled, and zero padding is only
  applied at the true image border;
* it writes only its core into the new whole-image maps and adds the float32
  mean/variance of that core (per sample and group, merged with Chan's
  formula, so halos are never counted twice) to the statistics of the next
  GroupNorm, which therefore normalises with whole-image statistics.

Without attention the tiled result thus equals the untiled one up to float
rounding. A segment spans one or two convolutions, so halos are a pixel or two:
hardly any work is repeated and overlapping tile copies are never stored.

The one approximation is the mid-block self-attention: it attends within the
tile's core plus ``_ATTENTION_CONTEXT`` latent pixels around it rather than
over the whole latent (global attention over a 4096² output's 512² latent is
far too slow). Each position keeps the value of the tile that owns it, so
every map stays single-valued and tiles cannot drift apart.

The whole-image maps wait on the CPU when the VAE runs on an accelerator (which
then holds one tile's working set) and stay where they are on the CPU; there
they take about two of the largest feature maps. The tiled path runs without
autograd, and the VAE module is neither modified nor hooked.

This module reads the diffusers VAE into that flat program of steps and holds the
entry points; the steps and their regions are in ``tiled_vae_steps``, the GroupNorm
statistics in ``tiled_vae_group_norm``, the segment-by-segment runner in ``tiled_vae_runner``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from ..errors import ImageInputError, SettingsError
from ..progress import CancelCheck, ProgressCallback, check_cancelled
from .runner import _run_tiled, _sizes
from .steps import _Activation, _Add, _Attention, _Conv, _Norm, _Save, _Step, _unsupported, _Upsample

__all__ = ["encode_moments", "decode_latents"]

# Extra latent pixels around a tile's core that its mid-block attention sees (the one approximation).
_ATTENTION_CONTEXT = 16


@dataclass
class _Program:
    """The steps of an encoder or decoder, in order, as a flat list."""

    steps: list[_Step] = field(default_factory=list)
    keys: int = 0

    def resnet(self, block: nn.Module) -> None:
        plain = type(block) is ResnetBlock2D and block.upsample is None and block.downsample is None
        # without a time embedding, "default" and "group" both run a plain norm2
        if not plain or block.time_emb_proj is not None or block.time_embedding_norm not in ("default", "group"):
            raise _unsupported(f"the residual block {type(block).__name__}")
        key, act = self._key(), _Activation(block.nonlinearity)
        shortcut = None if block.conv_shortcut is None else _Conv(block.conv_shortcut)
        self.steps += [_Save(key), _Norm(block.norm1), act, _Conv(block.conv1), _Norm(block.norm2), act]
        self.steps += [_Activation(block.dropout), _Conv(block.conv2), _Add(key, shortcut, block.output_scale_factor)]

    def mid_block(self, block: nn.Module) -> None:
        if type(block) is not UNetMidBlock2D:
            raise _unsupported(f"the mid block {type(block).__name__}")
        self.resnet(block.resnets[0])
        for attention, resnet in zip(block.attentions, block.resnets[1:], strict=True):
            if attention is not None:
                key = self._key()
                self.steps += [_Save(key), _Norm(attention.group_norm), _Attention(attention, _ATTENTION_CONTEXT)]
                self.steps.append(_Add(key, None, attention.rescale_output_factor))
            self.resnet(resnet)

    def _key(self) -> int:
        self.keys += 1
        return self.keys


def _encoder_program(vae: AutoencoderKL) -> _Program:
    encoder, program = vae.encoder, _Program()
    if type(encoder) is not Encoder:
        raise _unsupported(f"the encoder {type(encoder).__name__}")
    program.steps.append(_Conv(encoder.conv_in))
    for block in encoder.down_blocks:
        if type(block) is not DownEncoderBlock2D:
            raise _unsupported(f"the down block {type(block).__name__}")
        for resnet in block.resnets:
            program.resnet(resnet)
        for down in block.downsamplers or []:
            if type(down) is not Downsample2D or not down.use_conv or down.norm is not None:
                raise _unsupported(f"the downsampler {type(down).__name__} (need a plain strided conv)")
            program.steps.append(_Conv(down.conv, (0, 1, 0, 1) if down.padding == 0 else (0, 0, 0, 0)))
    program.mid_block(encoder.mid_block)
    program.steps += [_Norm(encoder.conv_norm_out), _Activation(encoder.conv_act), _Conv(encoder.conv_out)]
    if vae.quant_conv is not None:
        program.steps.append(_Conv(vae.quant_conv))
    return program


def _decoder_program(vae: AutoencoderKL) -> _Program:
    decoder, program = vae.decoder, _Program()
    if type(decoder) is not Decoder:
        raise _unsupported(f"the decoder {type(decoder).__name__}")
    if vae.post_quant_conv is not None:
        program.steps.append(_Conv(vae.post_quant_conv))
    program.steps.append(_Conv(decoder.conv_in))
    program.mid_block(decoder.mid_block)
    for block in decoder.up_blocks:
        if type(block) is not UpDecoderBlock2D:
            raise _unsupported(f"the up block {type(block).__name__}")
        for resnet in block.resnets:
            program.resnet(resnet)
        for up in block.upsamplers or []:
            if type(up) is not Upsample2D or not up.interpolate or up.use_conv_transpose or up.norm is not None:
                raise _unsupported(f"the upsampler {type(up).__name__} (need nearest ×2, then a conv)")
            program.steps.append(_Upsample())
            if up.use_conv:
                program.steps.append(_Conv(up.conv if up.name == "conv" else up.Conv2d_0))
    program.steps += [_Norm(decoder.conv_norm_out), _Activation(decoder.conv_act), _Conv(decoder.conv_out)]
    return program


def _check_tile_size(tile_size: int, minimum: int, unit: str) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or not (tile_size == 0 or tile_size >= minimum):
        raise SettingsError(f"tile_size must be 0 (never tile) or an integer >= {minimum} {unit}, got {tile_size!r}")


def _check_no_autograd(tensor: torch.Tensor) -> None:
    if torch.is_grad_enabled() and tensor.requires_grad:
        raise SettingsError("the tiled VAE runs without autograd; use tile_size=0 to back-propagate through the VAE")


def _fits_one_tile(height: int, width: int, tile_size: int) -> bool:
    return tile_size == 0 or (height <= tile_size and width <= tile_size)


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
) -> torch.Tensor:
    """``quant_conv(encoder(pixels))``: ``[B, 2·latent_channels, H/8, W/8]`` (mean and log-variance halves).

    ``pixels`` [B, 3, H, W] in [-1, 1], H and W multiples of 8, in the VAE's
    dtype and device. ``tile_size`` is the largest tile core in pixels
    (rounded down to a multiple of 8); 0 never tiles. An image within one tile
    gives exactly ``vae.encode(pixels).latent_dist.parameters``.
    """
    _check_tile_size(tile_size, 8, "pixels")
    channels = vae.config.in_channels
    if pixels.dim() != 4 or pixels.shape[1] != channels or pixels.shape[-2] % 8 or pixels.shape[-1] % 8:
        raise ImageInputError(
            f"VAE encode needs pixels [B, {channels}, H, W] with H, W multiples of 8, got {tuple(pixels.shape)}"
        )
    height, width = pixels.shape[-2:]
    if _fits_one_tile(height, width, tile_size):
        return _run_untiled(lambda: vae.encode(pixels).latent_dist.parameters, progress, should_cancel)
    program = _encoder_program(vae)
    latent_height = _sizes(program.steps, (height, width))[0][-1][0]
    factor = height // latent_height
    if factor * latent_height != height or tile_size < factor:
        raise SettingsError(
            f"tiled VAE encode: {height}x{width} px or tile_size {tile_size} do not fit the ×{factor} VAE"
        )
    _check_no_autograd(pixels)
    with torch.no_grad():
        return _run_tiled(program, pixels, tile_size // factor, progress, should_cancel)


def decode_latents(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    *,
    tile_size: int = 224,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """``decoder(post_quant_conv(latents))``: ``[B, 3, 8h, 8w]``, not clamped.

    ``latents`` [B, latent_channels, h, w] unscaled (already divided by the
    scaling factor), in the VAE's dtype and device. ``tile_size`` is the
    largest tile core in latent pixels; 0 never tiles. Latents within one tile
    give exactly ``vae.decode(latents).sample``.
    """
    _check_tile_size(tile_size, 1, "latent pixels")
    channels = vae.config.latent_channels
    if latents.dim() != 4 or latents.shape[1] != channels:
        raise ImageInputError(f"VAE decode needs latents [B, {channels}, h, w], got {tuple(latents.shape)}")
    height, width = latents.shape[-2:]
    if _fits_one_tile(height, width, tile_size):
        return _run_untiled(lambda: vae.decode(latents).sample, progress, should_cancel)
    program = _decoder_program(vae)
    _check_no_autograd(latents)
    with torch.no_grad():
        return _run_tiled(program, latents, tile_size, progress, should_cancel)
