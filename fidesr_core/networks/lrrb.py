"""Latent Residual Refinement Block (docs/algorithm.md §3).

An RRDB-style stack of three dense blocks; parameter names match the authors' ``lrrb_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseBlock(nn.Module):
    """Five 3x3 convs; each sees the block input and every earlier output."""

    def __init__(self, *, channels: int = 64, growth: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, growth, 3, padding=1)
        self.conv2 = nn.Conv2d(channels + growth, growth, 3, padding=1)
        self.conv3 = nn.Conv2d(channels + 2 * growth, growth, 3, padding=1)
        self.conv4 = nn.Conv2d(channels + 3 * growth, growth, 3, padding=1)
        self.conv5 = nn.Conv2d(channels + 4 * growth, channels, 3, padding=1)
        self.act = nn.SiLU()
        # The block starts as the identity of its residual branch (returns 0).
        nn.init.zeros_(self.conv5.weight)
        nn.init.zeros_(self.conv5.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(self.act(conv(torch.cat(features, dim=1))))
        return self.conv5(torch.cat(features, dim=1))


class LRRB(nn.Module):
    """``Δr`` ``[B, C, h, w]`` from ``cat([z_L, r])`` ``[B, 2C, h, w]``; an untrained block returns exactly 0."""

    residual_scale = 0.2

    def __init__(self, *, latent_channels: int = 4, channels: int = 64, growth: int = 32) -> None:
        super().__init__()
        self.in_conv = nn.Conv2d(2 * latent_channels, channels, 1)
        self.db1 = DenseBlock(channels=channels, growth=growth)
        self.db2 = DenseBlock(channels=channels, growth=growth)
        self.db3 = DenseBlock(channels=channels, growth=growth)
        self.out_conv = nn.Conv2d(channels, latent_channels, 1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.in_conv(x)
        for block in (self.db1, self.db2, self.db3):
            features = features + self.residual_scale * block(features)
        # No outer skip: the output is the correction itself (docs/algorithm.md §3).
        return self.out_conv(features)
