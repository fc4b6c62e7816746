"""Layout conversion between ComfyUI IMAGE (``[B, H, W, C]`` float32 in [0, 1] on the CPU) and the engine's."""

from __future__ import annotations

from typing import Any

import torch

from .errors import node_error


def image_to_engine(image: Any, node: str, input_name: str = "image") -> torch.Tensor:
    """``[B, H, W, 3 or 4]`` -> ``[B, 3, H, W]`` float32 (an alpha channel is dropped)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise node_error(node, f"{input_name} must be an IMAGE [batch, height, width, channels], got {shape}")
    channels = image.shape[-1]
    if channels not in (3, 4):
        raise node_error(node, f"{input_name} has {channels} channels; expected an RGB image (3 channels)")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise node_error(node, f"{input_name} is empty (shape {list(image.shape)})")
    return image[..., :3].permute(0, 3, 1, 2).float()


def image_from_engine(image: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ComfyUI IMAGE ``[B, H, W, 3]`` float32 on the CPU, contiguous."""
    return image.permute(0, 2, 3, 1).to(device="cpu", dtype=torch.float32).contiguous()
