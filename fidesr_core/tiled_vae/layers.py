"""The steps a tiled VAE run is made of: ``Layer`` steps know which input region (``Box``) an output region
needs and run on one tile; ``Norm``, ``Save`` and ``Add`` are markers the runner handles itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import BaseModelError

_ACTIVATIONS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU, nn.Identity, nn.Dropout)


class Box(NamedTuple):
    """The rectangle ``[top, bottom) × [left, right)`` of a whole-image map of ``height × width``."""

    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int

    def hull(self, other: Box | None) -> Box:
        if other is None:
            return self
        top, bottom = min(self.top, other.top), max(self.bottom, other.bottom)
        return self._replace(
            top=top, bottom=bottom, left=min(self.left, other.left), right=max(self.right, other.right)
        )

    def intersect(self, other: Box) -> Box:
        top, bottom = max(self.top, other.top), min(self.bottom, other.bottom)
        return self._replace(
            top=top, bottom=bottom, left=max(self.left, other.left), right=min(self.right, other.right)
        )

    def crop(self, tensor: torch.Tensor, inner: Box) -> torch.Tensor:
        """The part of ``tensor`` (which covers ``self``) that covers ``inner``."""
        if self.hull(inner) != self or inner.top >= inner.bottom or inner.left >= inner.right:
            raise AssertionError(f"tiled VAE: region {inner} is not inside {self}")
        top, left = inner.top - self.top, inner.left - self.left
        return tensor[..., top : top + inner.bottom - inner.top, left : left + inner.right - inner.left]

    def scaled_to(self, height: int, width: int) -> Box:
        """This latent-level box on a map of ``height × width``, an integer multiple of the latent."""
        fy, fx = height // self.height, width // self.width
        if fy * self.height != height or fx * self.width != width:
            raise AssertionError(f"tiled VAE: map {height}x{width} is not a multiple of the latent {self}")
        return Box(self.top * fy, self.bottom * fy, self.left * fx, self.right * fx, height, width)


class Layer:
    """A step on ``h`` alone. This base keeps every position where it is (an activation, dropout)."""

    module: nn.Module

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def out_channels(self, channels: int) -> int:
        return channels

    def needs(self, out: Box, in_size: tuple[int, int]) -> Box:
        """The input region from which ``run`` computes at least ``out``."""
        return out

    def run(self, x: torch.Tensor, box: Box) -> tuple[torch.Tensor, Box]:
        """``x`` covers ``box``; returns the output and the output region it covers exactly."""
        return self.module(x), box


class Activation(Layer):
    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, _ACTIVATIONS) or getattr(module, "inplace", False):
            raise unsupported(f"the activation {type(module).__name__}")
        self.module = module


def _conv_needs(start: int, stop: int, size: int, kernel: int, stride: int, before: int, *_: int) -> tuple[int, int]:
    """Input rows of a map of ``size`` rows that output rows ``[start, stop)`` read (padding excluded)."""
    return max(start * stride - before, 0), min((stop - 1) * stride - before + kernel, size)


def _conv_axis(start: int, stop: int, size: int, kernel: int, stride: int, before: int, after: int, own_pad: int):
    """One axis of a conv run on input rows ``[start, stop)`` of ``size`` rows; ``before``/``after``: the whole
    zero padding, ``own_pad``: the module's own.  Returns the output rows computed exactly, the local input rows
    to take, the zero rows to add, and the output rows to drop (padded by the module at an inner tile edge)."""
    out_size = (size + before + after - kernel) // stride + 1
    first = 0 if start == 0 else -(-(start + before) // stride)
    last = out_size if stop == size else (stop + before - kernel) // stride + 1
    low, high = first * stride - before, (last - 1) * stride - before + kernel  # padded input rows read
    pad = (max(0, -low), max(0, high - size))
    drop = (0, 0)
    if stride == 1 and own_pad:
        drop = (own_pad - min(pad[0], own_pad), own_pad - min(pad[1], own_pad))
        pad = (max(0, pad[0] - own_pad), max(0, pad[1] - own_pad))
    return (first, last), (max(low, 0) - start, min(high, size) - start), pad, drop


class Conv(Layer):
    """A zero-padded convolution; ``extra_pad`` is Downsample2D's ``F.pad`` (left, right, top, bottom)."""

    def __init__(self, module: nn.Module, extra_pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        conv = getattr(module, "base_layer", module)  # peft's LoRA layers wrap the conv
        usable = isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and tuple(conv.dilation) == (1, 1)
        if not usable or isinstance(conv.padding, str):
            raise unsupported(f"the conv {type(module).__name__} (need a zero-padded, undilated nn.Conv2d)")
        left, right, top, bottom = extra_pad
        # per axis (rows, columns): kernel, stride, padding before, padding after, the module's own padding
        self.axes = tuple(
            (k, s, p + b, p + a, p)
            for k, s, p, b, a in zip(
                conv.kernel_size, conv.stride, conv.padding, (top, left), (bottom, right), strict=True
            )
        )
        # a strided conv that pads itself cannot be run on a tile through the module: use its weights
        self.functional = any(stride > 1 and own_pad for _, stride, _, _, own_pad in self.axes)
        if self.functional and module is not conv:
            raise unsupported(f"the wrapped strided conv {type(module).__name__}")
        self.module, self.conv = module, conv

    def out_channels(self, channels: int) -> int:
        return self.conv.out_channels

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple((n + b + a - k) // s + 1 for n, (k, s, b, a, _) in zip(size, self.axes, strict=True))

    def needs(self, out: Box, in_size: tuple[int, int]) -> Box:
        rows = _conv_needs(out.top, out.bottom, in_size[0], *self.axes[0])
        return Box(*rows, *_conv_needs(out.left, out.right, in_size[1], *self.axes[1]), *in_size)

    def run(self, x: torch.Tensor, box: Box) -> tuple[torch.Tensor, Box]:
        rows, take_rows, pad_rows, drop_rows = _conv_axis(box.top, box.bottom, box.height, *self.axes[0])
        cols, take_cols, pad_cols, drop_cols = _conv_axis(box.left, box.right, box.width, *self.axes[1])
        x = x[..., take_rows[0] : take_rows[1], take_cols[0] : take_cols[1]]
        if any(pad_rows + pad_cols):
            x = F.pad(x, (*pad_cols, *pad_rows))
        if self.functional:
            y = F.conv2d(x, self.conv.weight, self.conv.bias, self.conv.stride, 0, 1, self.conv.groups)
        else:
            y = self.module(x)
        y = y[..., drop_rows[0] : y.shape[-2] - drop_rows[1], drop_cols[0] : y.shape[-1] - drop_cols[1]]
        out = Box(*rows, *cols, *self.out_size((box.height, box.width)))
        if tuple(y.shape[-2:]) != (out.bottom - out.top, out.right - out.left):
            raise AssertionError(f"tiled VAE: a conv gave {tuple(y.shape)} for region {out}")
        return y, out


class Upsample(Layer):
    """Nearest-neighbour ×2, as Upsample2D's ``F.interpolate(scale_factor=2.0)``."""

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] * 2, size[1] * 2

    def needs(self, out: Box, in_size: tuple[int, int]) -> Box:
        return Box(out.top // 2, -(-out.bottom // 2), out.left // 2, -(-out.right // 2), *in_size)

    def run(self, x: torch.Tensor, box: Box) -> tuple[torch.Tensor, Box]:
        return F.interpolate(x, scale_factor=2.0, mode="nearest"), Box(*(2 * value for value in box))


class MidBlockAttention(Layer):
    """``Attention`` minus its GroupNorm (a step of its own) and residual, over the tile plus ``context`` latent
    pixels around it."""

    def __init__(self, module: nn.Module, context: int) -> None:
        usable = isinstance(module, Attention) and isinstance(module.group_norm, nn.GroupNorm)
        if not usable or module.spatial_norm or module.norm_q or module.norm_k or module.is_cross_attention:
            raise unsupported(f"the mid-block attention {type(module).__name__}")
        if not module.residual_connection:
            raise unsupported("a mid-block attention without residual connection")
        self.module, self.context = module, context

    def needs(self, out: Box, in_size: tuple[int, int]) -> Box:
        margin, (height, width) = self.context, in_size
        top, bottom = max(out.top - margin, 0), min(out.bottom + margin, height)
        return Box(top, bottom, max(out.left - margin, 0), min(out.right + margin, width), height, width)

    def run(self, x: torch.Tensor, box: Box) -> tuple[torch.Tensor, Box]:
        attn, (batch, channels, height, width) = self.module, x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, h·w, C]
        query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.transpose(1, 2).reshape(batch, channels, height, width), box


@dataclass
class Norm:
    """A GroupNorm with whole-image statistics, gathered by the segment before it."""

    module: nn.GroupNorm

    def __post_init__(self) -> None:
        if not isinstance(self.module, nn.GroupNorm):
            raise unsupported(f"the normalisation {type(self.module).__name__} (need nn.GroupNorm)")


@dataclass
class Save:
    """Keep ``h`` under ``key`` for a later ``Add``."""

    key: int


@dataclass
class Add:
    """``h = (shortcut(saved) + h) / scale``: the residual of ResnetBlock2D and Attention."""

    key: int
    shortcut: Conv | None
    scale: float


Step = Layer | Norm | Save | Add


def unsupported(what: str) -> BaseModelError:
    return BaseModelError(f"tiled VAE does not support {what}; use an SD-style diffusers AutoencoderKL or tile_size=0")
