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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .errors import BaseModelError, ImageInputError, SettingsError
from .progress import CancelCheck, ProgressCallback, check_cancelled

__all__ = ["encode_moments", "decode_latents"]

# Extra latent pixels around a tile's core that its mid-block attention sees (the one approximation).
_ATTENTION_CONTEXT = 16
# Largest float32 temporary (elements) made while computing or applying a GroupNorm.
_NORM_CHUNK_ELEMENTS = 1 << 24
_ACTIVATIONS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU, nn.Identity, nn.Dropout)


class _Box(NamedTuple):
    """The rectangle ``[top, bottom) × [left, right)`` of a whole-image map of ``height × width``."""

    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int

    def hull(self, other: _Box | None) -> _Box:
        if other is None:
            return self
        top, bottom = min(self.top, other.top), max(self.bottom, other.bottom)
        return self._replace(
            top=top, bottom=bottom, left=min(self.left, other.left), right=max(self.right, other.right)
        )

    def intersect(self, other: _Box) -> _Box:
        top, bottom = max(self.top, other.top), min(self.bottom, other.bottom)
        return self._replace(
            top=top, bottom=bottom, left=max(self.left, other.left), right=min(self.right, other.right)
        )

    def crop(self, tensor: torch.Tensor, inner: _Box) -> torch.Tensor:
        """The part of ``tensor`` (which covers ``self``) that covers ``inner``."""
        if self.hull(inner) != self or inner.top >= inner.bottom or inner.left >= inner.right:
            raise AssertionError(f"tiled VAE: region {inner} is not inside {self}")
        top, left = inner.top - self.top, inner.left - self.left
        return tensor[..., top : top + inner.bottom - inner.top, left : left + inner.right - inner.left]

    def scaled_to(self, height: int, width: int) -> _Box:
        """This latent-level box on a map of ``height × width``, an integer multiple of the latent."""
        fy, fx = height // self.height, width // self.width
        if fy * self.height != height or fx * self.width != width:
            raise AssertionError(f"tiled VAE: map {height}x{width} is not a multiple of the latent {self}")
        return _Box(self.top * fy, self.bottom * fy, self.left * fx, self.right * fx, height, width)


class _Layer:
    """A step on ``h`` alone. This base keeps every position where it is (an activation, dropout)."""

    module: nn.Module

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def needs(self, out: _Box, in_size: tuple[int, int]) -> _Box:
        """The input region from which ``run`` computes at least ``out``."""
        return out

    def run(self, x: torch.Tensor, box: _Box) -> tuple[torch.Tensor, _Box]:
        """``x`` covers ``box``; returns the output and the output region it covers exactly."""
        return self.module(x), box


class _Activation(_Layer):
    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, _ACTIVATIONS) or getattr(module, "inplace", False):
            raise _unsupported(f"the activation {type(module).__name__}")
        self.module = module


def _conv_needs(start: int, stop: int, size: int, kernel: int, stride: int, before: int, *_: int) -> tuple[int, int]:
    """Input rows of a map of ``size`` rows that output rows ``[start, stop)`` read (padding excluded)."""
    return max(start * stride - before, 0), min((stop - 1) * stride - before + kernel, size)


def _conv_axis(start: int, stop: int, size: int, kernel: int, stride: int, before: int, after: int, own_pad: int):
    """One axis of a conv run on input rows ``[start, stop)`` of a map of ``size`` rows.

    ``before``/``after`` are the whole zero padding, ``own_pad`` the part the
    module adds itself. Returns the output rows computed exactly, the local
    input rows to take, the zero rows to add, and the output rows to drop
    (those the module padded at an inner tile edge, where real data lies).
    """
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


class _Conv(_Layer):
    """A zero-padded convolution; ``extra_pad`` is Downsample2D's ``F.pad`` (left, right, top, bottom)."""

    def __init__(self, module: nn.Module, extra_pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        conv = getattr(module, "base_layer", module)  # peft's LoRA layers wrap the conv
        usable = isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and tuple(conv.dilation) == (1, 1)
        if not usable or isinstance(conv.padding, str):
            raise _unsupported(f"the conv {type(module).__name__} (need a zero-padded, undilated nn.Conv2d)")
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
            raise _unsupported(f"the wrapped strided conv {type(module).__name__}")
        self.module, self.conv = module, conv

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple((n + b + a - k) // s + 1 for n, (k, s, b, a, _) in zip(size, self.axes, strict=True))

    def needs(self, out: _Box, in_size: tuple[int, int]) -> _Box:
        rows = _conv_needs(out.top, out.bottom, in_size[0], *self.axes[0])
        return _Box(*rows, *_conv_needs(out.left, out.right, in_size[1], *self.axes[1]), *in_size)

    def run(self, x: torch.Tensor, box: _Box) -> tuple[torch.Tensor, _Box]:
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
        out = _Box(*rows, *cols, *self.out_size((box.height, box.width)))
        if tuple(y.shape[-2:]) != (out.bottom - out.top, out.right - out.left):
            raise AssertionError(f"tiled VAE: a conv gave {tuple(y.shape)} for region {out}")
        return y, out


class _Upsample(_Layer):
    """Nearest-neighbour ×2, as Upsample2D's ``F.interpolate(scale_factor=2.0)``."""

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] * 2, size[1] * 2

    def needs(self, out: _Box, in_size: tuple[int, int]) -> _Box:
        return _Box(out.top // 2, -(-out.bottom // 2), out.left // 2, -(-out.right // 2), *in_size)

    def run(self, x: torch.Tensor, box: _Box) -> tuple[torch.Tensor, _Box]:
        return F.interpolate(x, scale_factor=2.0, mode="nearest"), _Box(*(2 * value for value in box))


class _Attention(_Layer):
    """``Attention`` minus its GroupNorm (a step of its own) and residual, over the tile plus some context."""

    def __init__(self, module: nn.Module) -> None:
        usable = isinstance(module, Attention) and isinstance(module.group_norm, nn.GroupNorm)
        if not usable or module.spatial_norm or module.norm_q or module.norm_k or module.is_cross_attention:
            raise _unsupported(f"the mid-block attention {type(module).__name__}")
        if not module.residual_connection:
            raise _unsupported("a mid-block attention without residual connection")
        self.module = module

    def needs(self, out: _Box, in_size: tuple[int, int]) -> _Box:
        margin, (height, width) = _ATTENTION_CONTEXT, in_size
        top, bottom = max(out.top - margin, 0), min(out.bottom + margin, height)
        return _Box(top, bottom, max(out.left - margin, 0), min(out.right + margin, width), height, width)

    def run(self, x: torch.Tensor, box: _Box) -> tuple[torch.Tensor, _Box]:
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
class _Norm:
    """A GroupNorm with whole-image statistics, gathered by the segment before it."""

    module: nn.GroupNorm

    def __post_init__(self) -> None:
        if not isinstance(self.module, nn.GroupNorm):
            raise _unsupported(f"the normalisation {type(self.module).__name__} (need nn.GroupNorm)")


@dataclass
class _Save:
    """Keep ``h`` under ``key`` for a later ``_Add``."""

    key: int


@dataclass
class _Add:
    """``h = (shortcut(saved) + h) / scale``: the residual of ResnetBlock2D and Attention."""

    key: int
    shortcut: _Conv | None
    scale: float


_Step = _Layer | _Norm | _Save | _Add


def _group_chunks(x: torch.Tensor, groups: int) -> list[slice]:
    """Channel slices of whole groups: all channels for float32 ``x``; otherwise as many as keep a float32
    copy under ``_NORM_CHUNK_ELEMENTS``."""
    if x.dtype == torch.float32:
        return [slice(None)]
    per_group = x.shape[1] // groups
    step = per_group * max(1, _NORM_CHUNK_ELEMENTS // max(1, x[:, :per_group].numel()))
    return [slice(c, c + step) for c in range(0, x.shape[1], step)]


class _GroupStats:
    """Per-sample, per-group mean and variance (float32) of a whole map, merged tile by tile (Chan et al.)."""

    def __init__(self, groups: int) -> None:
        self.groups, self.count = groups, 0
        self.mean: torch.Tensor | float = 0.0  # [B, G]
        self.m2: torch.Tensor | float = 0.0  # [B, G] sum of squared deviations from the mean

    def add(self, x: torch.Tensor) -> None:
        """Add one tile's core ``x`` [B, C, h, w]."""
        per_group = x.shape[1] // self.groups
        means, variances = [], []
        for s in _group_chunks(x, self.groups):
            values = x[:, s].float().unflatten(1, (-1, per_group))  # [B, groups, C/G, h, w]
            # E[x²] − E[x]² is several times faster than var_mean; take it only where it cannot cancel badly
            mean = values.mean((2, 3, 4))
            var = torch.linalg.vector_norm(values, dim=(2, 3, 4)).square() / values[0, 0].numel() - mean.square()
            if not bool((mean.square() <= 64 * var).all()):
                var, mean = torch.var_mean(values, (2, 3, 4), correction=0)
            means.append(mean)
            variances.append(var)
        mean, var, count, before = torch.cat(means, 1), torch.cat(variances, 1), x[0, :per_group].numel(), self.count
        self.count += count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / self.count)
        self.m2 = self.m2 + var * count + delta.square() * (before * count / self.count)

    def normalize(self, x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        """``norm(x)`` with these whole-image statistics instead of ``x``'s own, computed in float32."""
        per_group = x.shape[1] // self.groups
        scale = torch.rsqrt(self.m2 / self.count + norm.eps).repeat_interleave(per_group, 1)  # [B, C]
        shift = -self.mean.repeat_interleave(per_group, 1) * scale
        if norm.affine:
            scale, shift = scale * norm.weight.float(), shift * norm.weight.float() + norm.bias.float()
        if x.dtype == torch.float32:
            return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])
        out = torch.empty_like(x)
        for s in _group_chunks(x, self.groups):
            out[:, s] = torch.addcmul(shift[:, s, None, None], x[:, s].float(), scale[:, s, None, None])
        return out


def _unsupported(what: str) -> BaseModelError:
    return BaseModelError(f"tiled VAE does not support {what}; use an SD-style diffusers AutoencoderKL or tile_size=0")


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
                self.steps += [_Save(key), _Norm(attention.group_norm), _Attention(attention)]
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


def _sizes(steps: list[_Step], size: tuple[int, int]) -> tuple[list[tuple[int, int]], dict[int, tuple[int, int]]]:
    """Whole-image size of ``h`` before each step (and after the last one), and of each saved value."""
    sizes, saved = [size], {}
    for step in steps:
        if isinstance(step, _Save):
            saved[step.key] = sizes[-1]
        sizes.append(step.out_size(sizes[-1]) if isinstance(step, _Layer) else sizes[-1])
    return sizes, saved


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    """``ceil(length / tile)`` near-equal spans that partition ``range(length)``."""
    count = -(-length // tile)
    return [(i * length // count, (i + 1) * length // count) for i in range(count)]


def _needs(segment: list[_Step], first_size: list, saved_sizes: dict, wanted: dict[str | int, _Box]) -> dict:
    """Walk a segment backwards from the regions ``wanted`` at its end (``"h"`` and saved keys) to those it reads.

    ``first_size[i]`` is the size of ``h`` before ``segment[i]``.
    """
    needed = dict(wanted)
    for step, size in zip(reversed(segment), reversed(first_size), strict=True):
        if isinstance(step, _Add):
            skip = needed["h"] if step.shortcut is None else step.shortcut.needs(needed["h"], saved_sizes[step.key])
            needed[step.key] = skip.hull(needed.get(step.key))
        elif isinstance(step, _Save):
            needed["h"] = needed["h"].hull(needed.pop(step.key, None))
        elif isinstance(step, _Layer):
            needed["h"] = step.needs(needed["h"], size)
    return needed


def _run_steps(segment: list[_Step], values: dict, stats: _GroupStats | None) -> tuple[torch.Tensor, _Box]:
    """Run a segment on one tile; ``values`` maps ``"h"`` and saved keys to (tensor, region)."""
    for step in segment:
        h, box = values["h"]
        if isinstance(step, _Save):
            values[step.key] = values["h"]
        elif isinstance(step, _Add):
            skip, skip_box = values.pop(step.key)
            if step.shortcut is not None:
                skip, skip_box = step.shortcut.run(skip, skip_box)
            common = box.intersect(skip_box)
            values["h"] = ((skip_box.crop(skip, common) + box.crop(h, common)) / step.scale, common)
        elif isinstance(step, _Norm):
            values["h"] = (stats.normalize(h, step.module), box)
        else:
            values["h"] = step.run(h, box)
    return values["h"]


def _spare_maps(maps: dict, owned: set, consumed: set, plans: list, saved_sizes: dict) -> list[str | int]:
    """Saved maps that the new ``h`` may overwrite: they die in this segment, are no other key's map, and
    every tile reads them only inside its own core (before writing its core of ``h``)."""

    def read_inside_cores(key: int) -> bool:
        return all(
            core.scaled_to(*saved_sizes[key]).hull(need[key]) == core.scaled_to(*saved_sizes[key])
            for core, need in plans
        )

    return [
        key for key in consumed & owned if sum(m is maps[key] for m in maps.values()) == 1 and read_inside_cores(key)
    ]


def _store(maps: dict, key: str | int, piece: torch.Tensor, target: _Box, reuse: list, device: torch.device) -> None:
    """Write a tile's core ``piece`` (covering ``target``) into ``maps[key]``, made on first use (from
    ``reuse`` when one of those maps has the right shape)."""
    if key not in maps:
        shape = (*piece.shape[:2], target.height, target.width)
        fits = [m for m in reuse if m.shape == shape and m.dtype == piece.dtype]
        maps[key] = fits[0] if fits else piece.new_empty(shape, device=device)
    maps[key][..., target.top : target.bottom, target.left : target.right] = piece


def _run_tiled(
    program: _Program,
    source: torch.Tensor,
    tile: int,
    progress: ProgressCallback | None,
    should_cancel: CancelCheck | None,
) -> torch.Tensor:
    """Run ``program`` on ``source`` [B, C, H, W] in tiles whose latent-level cores are at most ``tile`` pixels."""
    steps, device = program.steps, source.device
    storage = device if device.type == "cpu" else torch.device("cpu")  # where whole-image maps wait
    sizes, saved_sizes = _sizes(steps, tuple(source.shape[-2:]))
    latent = sizes[-1] if sizes[-1][0] < sizes[0][0] else sizes[0]  # the encoder's output, the decoder's input
    cores = [_Box(*rows, *cols, *latent) for rows in _spans(latent[0], tile) for cols in _spans(latent[1], tile)]
    bounds = [0] + [i for i, step in enumerate(steps) if isinstance(step, _Norm)] + [len(steps)]
    maps: dict[str | int, torch.Tensor] = {"h": source}
    owned: set[str | int] = set()  # maps allocated here (the caller's tensor is never written)
    stats, total, done = None, (len(bounds) - 1) * len(cores), 0
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        segment, last = steps[start:stop], stop == len(steps)
        consumed = {step.key for step in segment if isinstance(step, _Add)}
        saved = [step.key for step in segment if isinstance(step, _Save) and step.key not in consumed]
        aliased = segment[-1].key if isinstance(segment[-1], _Save) else None  # saved value is h itself
        next_stats = None if last else _GroupStats(steps[stop].module.num_groups)
        plans = []
        for core in cores:
            wanted = {key: core.scaled_to(*saved_sizes[key]) for key in saved} | {"h": core.scaled_to(*sizes[stop])}
            plans.append((core, _needs(segment, sizes[start:stop], saved_sizes, wanted)))
        spare = [] if last else _spare_maps(maps, owned, consumed, plans, saved_sizes)
        new_maps: dict[str | int, torch.Tensor] = {}
        for core, needed in plans:
            check_cancelled(should_cancel)
            values = {
                key: (maps[key][..., b.top : b.bottom, b.left : b.right].to(device), b) for key, b in needed.items()
            }
            values["h"] = _run_steps(segment, values, stats)
            for key in ["h"] + [key for key in saved if key != aliased]:
                value, box = values[key]
                target = core.scaled_to(box.height, box.width)
                piece = box.crop(value, target)
                if key == "h" and next_stats is not None:
                    next_stats.add(piece)
                reuse = [maps[k] for k in spare] if key == "h" else []
                _store(new_maps, key, piece, target, reuse, device if last else storage)
            done += 1
            if progress is not None:
                progress(done, total)
        if aliased is not None:
            new_maps[aliased] = new_maps["h"]
        for key in consumed:
            del maps[key]
        maps.update(new_maps)
        owned = (owned - consumed) | set(new_maps)
        stats = next_stats
    return maps["h"]


def _check_tile_size(tile_size: int, minimum: int, unit: str) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or not (tile_size == 0 or tile_size >= minimum):
        raise SettingsError(f"tile_size must be 0 (never tile) or an integer >= {minimum} {unit}, got {tile_size!r}")


def _check_no_autograd(tensor: torch.Tensor) -> None:
    if torch.is_grad_enabled() and tensor.requires_grad:
        raise SettingsError("the tiled VAE runs without autograd; use tile_size=0 to back-propagate through the VAE")


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
    if tile_size == 0 or (height <= tile_size and width <= tile_size):
        check_cancelled(should_cancel)
        moments = vae.encode(pixels).latent_dist.parameters
        if progress is not None:
            progress(1, 1)
        return moments
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
    if tile_size == 0 or (height <= tile_size and width <= tile_size):
        check_cancelled(should_cancel)
        decoded = vae.decode(latents).sample
        if progress is not None:
            progress(1, 1)
        return decoded
    program = _decoder_program(vae)
    _check_no_autograd(latents)
    with torch.no_grad():
        return _run_tiled(program, latents, tile_size, progress, should_cancel)
