"""The diffusers encoder or decoder read into one flat list of tiled-VAE steps (docs/algorithm.md §2.10)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .layers import Activation, Add, Conv, MidBlockAttention, Norm, Save, Step, Upsample, unsupported

# Extra latent pixels around a tile's core that its mid-block attention sees (the one approximation).
ATTENTION_CONTEXT = 16


@dataclass
class Program:
    """The steps of an encoder or decoder, in order, as a flat list."""

    steps: list[Step] = field(default_factory=list)
    keys: Iterator[int] = field(default_factory=count)  # for the saved values (Save and Add)

    def resnet(self, block: nn.Module) -> None:
        plain = type(block) is ResnetBlock2D and block.upsample is None and block.downsample is None
        # without a time embedding, "default" and "group" both run a plain norm2
        if not plain or block.time_emb_proj is not None or block.time_embedding_norm not in ("default", "group"):
            raise unsupported(f"the residual block {type(block).__name__}")
        key, act = next(self.keys), Activation(block.nonlinearity)
        shortcut = None if block.conv_shortcut is None else Conv(block.conv_shortcut)
        self.steps += [Save(key), Norm(block.norm1), act, Conv(block.conv1), Norm(block.norm2), act]
        self.steps += [Activation(block.dropout), Conv(block.conv2), Add(key, shortcut, block.output_scale_factor)]

    def mid_block(self, block: nn.Module) -> None:
        if type(block) is not UNetMidBlock2D:
            raise unsupported(f"the mid block {type(block).__name__}")
        self.resnet(block.resnets[0])
        for attention, resnet in zip(block.attentions, block.resnets[1:], strict=True):
            if attention is not None:
                key = next(self.keys)
                self.steps += [Save(key), Norm(attention.group_norm), MidBlockAttention(attention, ATTENTION_CONTEXT)]
                self.steps.append(Add(key, None, attention.rescale_output_factor))
            self.resnet(resnet)

    def layout(self) -> torch.memory_format:
        """channels_last when the VAE's convolutions are (maps in that format feed them without a copy)."""
        for step in self.steps:
            if isinstance(step, Conv):
                weight = step.conv.weight
                nhwc, nchw = weight.is_contiguous(memory_format=torch.channels_last), weight.is_contiguous()
                if nhwc != nchw:  # a 1×1 kernel (or one input channel) is both: look further
                    return torch.channels_last if nhwc else torch.contiguous_format
        return torch.contiguous_format


def encoder_program(vae: AutoencoderKL) -> Program:
    encoder, program = vae.encoder, Program()
    if type(encoder) is not Encoder:
        raise unsupported(f"the encoder {type(encoder).__name__}")
    program.steps.append(Conv(encoder.conv_in))
    for block in encoder.down_blocks:
        if type(block) is not DownEncoderBlock2D:
            raise unsupported(f"the down block {type(block).__name__}")
        for resnet in block.resnets:
            program.resnet(resnet)
        for down in block.downsamplers or []:
            if type(down) is not Downsample2D or not down.use_conv or down.norm is not None:
                raise unsupported(f"the downsampler {type(down).__name__} (need a plain strided conv)")
            program.steps.append(Conv(down.conv, (0, 1, 0, 1) if down.padding == 0 else (0, 0, 0, 0)))
    program.mid_block(encoder.mid_block)
    program.steps += [Norm(encoder.conv_norm_out), Activation(encoder.conv_act), Conv(encoder.conv_out)]
    if vae.quant_conv is not None:
        program.steps.append(Conv(vae.quant_conv))
    return program


def decoder_program(vae: AutoencoderKL) -> Program:
    decoder, program = vae.decoder, Program()
    if type(decoder) is not Decoder:
        raise unsupported(f"the decoder {type(decoder).__name__}")
    if vae.post_quant_conv is not None:
        program.steps.append(Conv(vae.post_quant_conv))
    program.steps.append(Conv(decoder.conv_in))
    program.mid_block(decoder.mid_block)
    for block in decoder.up_blocks:
        if type(block) is not UpDecoderBlock2D:
            raise unsupported(f"the up block {type(block).__name__}")
        for resnet in block.resnets:
            program.resnet(resnet)
        for up in block.upsamplers or []:
            if type(up) is not Upsample2D or not up.interpolate or up.use_conv_transpose or up.norm is not None:
                raise unsupported(f"the upsampler {type(up).__name__} (need nearest ×2, then a conv)")
            program.steps.append(Upsample())
            if up.use_conv:
                program.steps.append(Conv(up.conv if up.name == "conv" else up.Conv2d_0))
    program.steps += [Norm(decoder.conv_norm_out), Activation(decoder.conv_act), Conv(decoder.conv_out)]
    return program
