"""``FIDESR_MODEL``: what the loader hands to the other nodes.

A handle wraps the engine's ``FiDeSRModel`` together with the devices ComfyUI
chose for it when it was loaded: it rests on ``offload_device`` and runs on
``load_device`` (see ``runtime.model_on_device``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..fidesr_core.networks.model import FiDeSRModel
from .errors import node_error

__all__ = ["FIDESR_MODEL", "FiDeSRModelHandle", "require_handle"]

FIDESR_MODEL = "FIDESR_MODEL"  # the custom ComfyUI socket type


@dataclass(eq=False)
class FiDeSRModelHandle:
    model: FiDeSRModel
    load_device: torch.device
    offload_device: torch.device
    base_name: str
    weights_name: str
    # How many node steps are running on load_device right now; nested steps (FiDeSR Upscale
    # runs several) leave the model where it is.
    active_users: int = field(default=0, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cross_attention_dim(self) -> int:
        return int(self.model.unet.config.cross_attention_dim)

    def __str__(self) -> str:
        return f"FiDeSR({self.base_name} + {self.weights_name}, {self.dtype}, runs on {self.load_device})"


def require_handle(value: object, node: str) -> FiDeSRModelHandle:
    """``value`` as a handle, or an error saying to connect Load FiDeSR Model."""
    if not isinstance(value, FiDeSRModelHandle):
        raise node_error(node, f"model must come from Load FiDeSR Model, got {type(value).__name__}")
    return value
