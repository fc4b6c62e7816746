"""Whole-image GroupNorm statistics for the tiled VAE: each tile adds the float32 mean and variance of its core
(Chan's formula; halos never count twice), and the next GroupNorm normalises every tile with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Largest float32 temporary (elements) made while gathering the statistics of a half-precision tile.
_CHUNK_ELEMENTS = 1 << 24


class GroupStats:
    """Per-sample, per-group mean and variance (float32) of a whole map, merged tile by tile (Chan et al.)."""

    def __init__(self, groups: int) -> None:
        self.groups, self.count = groups, 0
        self.mean: torch.Tensor | float = 0.0  # [B, G]
        self.m2: torch.Tensor | float = 0.0  # [B, G] sum of squared deviations from the mean

    def add(self, x: torch.Tensor) -> None:
        """Add one tile's core ``x`` [B, C, h, w]."""
        per_group, count = x.shape[1] // self.groups, x[0, : x.shape[1] // self.groups].numel()
        if x.dtype == torch.float32:
            values = x.unflatten(1, (self.groups, per_group))  # [B, G, C/G, h, w]
            mean = values.mean((2, 3, 4))
            square = torch.linalg.vector_norm(values, dim=(2, 3, 4)).square() / count
        else:  # half types: float32 per-channel sums over chunks of rows, channels innermost (fast for NHWC)
            rows = x.permute(0, 2, 3, 1)  # [B, h, w, C]
            step = max(1, _CHUNK_ELEMENTS // max(1, rows[:, :1].numel()))
            total = square = 0.0
            for top in range(0, rows.shape[1], step):
                part = rows[:, top : top + step].to(torch.float32, memory_format=torch.contiguous_format)
                total = total + part.sum((1, 2))
                square = square + part.square_().sum((1, 2))
            mean = total.unflatten(1, (self.groups, per_group)).sum(2) / count  # [B, G]
            square = square.unflatten(1, (self.groups, per_group)).sum(2) / count
        # E[x²] − E[x]² is several times faster than var_mean; take it only where it cannot cancel badly
        var = square - mean.square()
        if not bool((mean.square() <= 64 * var).all()):
            var, mean = torch.var_mean(x.float().unflatten(1, (self.groups, per_group)), (2, 3, 4), correction=0)
        before = self.count
        self.count += count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / self.count)
        self.m2 = self.m2 + var * count + delta.square() * (before * count / self.count)

    def normalize(self, x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        """``norm(x)`` with these whole-image statistics instead of ``x``'s own, computed in float32."""
        per_group = x.shape[1] // self.groups
        if x.dtype != torch.float32:
            # an inference batch norm with per-channel copies of the group statistics is the same affine map,
            # and oneDNN runs it on half-precision NHWC tensors several times faster than elementwise ops
            mean = self.mean.repeat_interleave(per_group, 1)  # [B, C]
            var = (self.m2 / self.count).repeat_interleave(per_group, 1)
            weight, bias = (norm.weight.float(), norm.bias.float()) if norm.affine else (None, None)
            samples = [
                F.batch_norm(x[b : b + 1], mean[b], var[b], weight, bias, False, 0.0, norm.eps)
                for b in range(x.shape[0])
            ]
            return samples[0] if len(samples) == 1 else torch.cat(samples)
        scale = torch.rsqrt(self.m2 / self.count + norm.eps).repeat_interleave(per_group, 1)  # [B, C]
        shift = -self.mean.repeat_interleave(per_group, 1) * scale
        if norm.affine:
            scale, shift = scale * norm.weight.float(), shift * norm.weight.float() + norm.bias.float()
        return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])
