"""Whole-image GroupNorm statistics for the tiled VAE, gathered tile by tile and applied to one tile.

Internal to ``fidesr_core.tiled_vae.codec``: each tile adds the float32 mean and variance of its
core (merged with Chan's formula, so halos are never counted twice); the next GroupNorm then
normalises every tile with the statistics of the whole map.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GroupStats"]

# Largest float32 temporary (elements) made while computing or applying a GroupNorm.
_NORM_CHUNK_ELEMENTS = 1 << 24


def _group_chunks(x: torch.Tensor, groups: int) -> list[slice]:
    """Channel slices of whole groups: all channels for float32 ``x``; otherwise as many as keep a float32
    copy under ``_NORM_CHUNK_ELEMENTS``."""
    if x.dtype == torch.float32:
        return [slice(None)]
    per_group = x.shape[1] // groups
    step = per_group * max(1, _NORM_CHUNK_ELEMENTS // max(1, x[:, :per_group].numel()))
    return [slice(c, c + step) for c in range(0, x.shape[1], step)]


class GroupStats:
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
