"""FiDeSR Upscale: the whole method in one node.

It runs exactly the steps of the composable nodes (Encode → One-Step U-Net →
LRRB Refine → LF → HF → Decode), with their defaults for everything it does
not expose, so it gives the same result as that chain.  The model stays on
the torch device for the whole run.
"""

from __future__ import annotations

from typing import Any

import torch

from ..fidesr_core.pipeline import UpscaleSettings
from .codec_nodes import decode_step, encode_step
from .frequency_nodes import high_frequency_step, low_frequency_step
from .inputs import (
    CATEGORY,
    COLOR_FIX_INPUT,
    LATENT_MODE_INPUT,
    LQ_IMAGE_INPUT,
    MODEL_INPUT,
    POSITIVE_INPUT,
    SEED_INPUT,
    TILE_OVERLAP_INPUT,
    TILE_SIZE_INPUT,
    UPSCALE_BY_INPUT,
)
from .model_handle import FiDeSRModelHandle, require_handle
from .restoration_nodes import refine_step, residual_step
from .runtime import model_on_device

__all__ = ["FiDeSRUpscale"]

_ENGINE_DEFAULTS = UpscaleSettings()


def _strength_input(branch: str, default: float) -> tuple[str, dict]:
    return (
        "FLOAT",
        {
            "default": default,
            "min": 0.0,
            "max": 2.0,
            "step": 0.01,
            "tooltip": f"Effective strength of the training-free {branch} injection; 0 turns it off. LF 0.1 + HF 0.1 "
            "equals the authors' script defaults.",
        },
    )


class FiDeSRUpscale:
    DISPLAY_NAME = "FiDeSR Upscale"
    DESCRIPTION = (
        "FiDeSR in one node: restores and upscales the image with one diffusion step (LoRA U-Net residual, LRRB "
        "refinement), training-free LF/HF frequency injection and colour correction. Same result as the chain of "
        "FiDeSR VAE Encode, One-Step U-Net, LRRB Refine, LF Injection, HF Injection and VAE Decode."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The restored, upscaled image.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": MODEL_INPUT,
                "image": LQ_IMAGE_INPUT,
                "upscale_by": UPSCALE_BY_INPUT,
                "lf_strength": _strength_input("low-frequency (structure)", _ENGINE_DEFAULTS.low.strength),
                "hf_strength": _strength_input("high-frequency (detail)", _ENGINE_DEFAULTS.high.strength),
                "color_fix": COLOR_FIX_INPUT,
                "latent_mode": LATENT_MODE_INPUT,
                "seed": SEED_INPUT,
                "tile_size": TILE_SIZE_INPUT,
                "tile_overlap": TILE_OVERLAP_INPUT,
            },
            "optional": {"positive": POSITIVE_INPUT},
        }

    def upscale(
        self,
        model: FiDeSRModelHandle,
        image: torch.Tensor,
        upscale_by: float = 4.0,
        lf_strength: float = 0.1,
        hf_strength: float = 0.1,
        color_fix: str = "adain",
        latent_mode: str = "sample",
        seed: int = 0,
        tile_size: int = 96,
        tile_overlap: int = 32,
        positive: Any = None,
    ) -> tuple[torch.Tensor]:
        node = self.DISPLAY_NAME
        handle = require_handle(model, node)
        with model_on_device(handle, working_bytes=0):
            latent = encode_step(
                handle,
                image,
                upscale_by=upscale_by,
                latent_mode=latent_mode,
                seed=seed,
                tile_size=_ENGINE_DEFAULTS.encode_tile_size,
                node=node,
            )
            latent = residual_step(
                handle, latent, tile_size=tile_size, tile_overlap=tile_overlap, positive=positive, node=node
            )
            latent = refine_step(handle, latent, node=node)
            # A strength of 0 adds exactly nothing; skipping the branch only saves its detail map.
            if lf_strength != 0:
                latent = low_frequency_step(latent, {"strength": lf_strength}, node=node)
            if hf_strength != 0:
                latent = high_frequency_step(latent, {"strength": hf_strength}, node=node)
            result = decode_step(
                handle, latent, color_fix=color_fix, tile_size=_ENGINE_DEFAULTS.decode_tile_size, node=node
            )
        return (result,)
