"""FiDeSR VAE Encode and FiDeSR VAE Decode.

Encode prepares the LQ image as the released test script does (min-side rule,
bicubic ×``upscale_by``, sides to multiples of 8), encodes it and starts the
FiDeSR state.  Decode turns any FiDeSR latent back into an image, colour-fixed
against the upscaled input and resized to exactly ``upscale_by`` × the input.
"""

from __future__ import annotations

from typing import Any

import torch

from ..fidesr_core.pipeline import finish_image
from ..fidesr_core.steps.color_fix import COLOR_FIX_METHODS
from ..fidesr_core.steps.preprocess import prepare_lq
from ..fidesr_core.steps.vae_codec import LATENT_MODES, decode_latent, encode_image
from .errors import engine_errors, node_error
from .images import image_from_engine, image_to_engine
from .inputs import (
    CATEGORY,
    COLOR_FIX_INPUT,
    LATENT_MODE_INPUT,
    LQ_IMAGE_INPUT,
    MODEL_INPUT,
    SEED_INPUT,
    UPSCALE_BY_INPUT,
)
from .latent_state import DECODE_NODE, ENCODE_NODE, FiDeSRLatentState, make_latent, read_state
from .model_handle import FiDeSRModelHandle, require_handle
from .runtime import TileProgress, interrupt_check, model_on_device, retry_with_smaller_tile, working_memory_bytes

__all__ = ["FiDeSREncode", "FiDeSRDecode", "encode_step", "decode_step"]


def _tiles_pixels(height: int, width: int, tile: int) -> int:
    return min(height, tile) * min(width, tile) if tile > 0 else height * width


def encode_step(
    handle: FiDeSRModelHandle,
    image: Any,
    *,
    upscale_by: float,
    latent_mode: str,
    seed: int,
    tile_size: int,
    node: str,
) -> dict[str, Any]:
    """IMAGE -> FiDeSR LATENT (samples = z_L, unscaled)."""
    handle = require_handle(handle, node)
    if latent_mode not in LATENT_MODES:
        raise node_error(node, f"latent_mode {latent_mode!r} is not one of {', '.join(LATENT_MODES)}")
    pixels = image_to_engine(image, node)
    with engine_errors(node):
        prepared = prepare_lq(pixels, upscale_by=upscale_by)
        batch, _, height, width = prepared.pixels.shape
        working = working_memory_bytes(batch * _tiles_pixels(height, width, tile_size), handle.dtype)
        with model_on_device(handle, working):

            def run(tile: int) -> torch.Tensor:
                return encode_image(
                    handle.model,
                    prepared.pixels,
                    latent_mode=latent_mode,
                    seed=seed,
                    tile_size=tile,
                    progress=TileProgress(),
                    should_cancel=interrupt_check,
                )

            z_lq = retry_with_smaller_tile(node, run, tile_size, full_size=max(height, width))
    state = FiDeSRLatentState.from_encoding(z_lq, prepared.pixels, prepared.output_size, handle.model.scaling_factor)
    return make_latent(state.to_samples(state.z_lq), state)


def decode_step(handle: FiDeSRModelHandle, latent: Any, *, color_fix: str, tile_size: int, node: str) -> torch.Tensor:
    """FiDeSR LATENT -> IMAGE ``[B, H, W, 3]``, colour-fixed and at the output size."""
    handle = require_handle(handle, node)
    if color_fix not in COLOR_FIX_METHODS:
        raise node_error(node, f"color_fix {color_fix!r} is not one of {', '.join(COLOR_FIX_METHODS)}")
    state = read_state(
        latent,
        node,
        connect_to="a FiDeSR node (VAE Encode, One-Step U-Net, LRRB Refine, LF/HF Injection); "
        "ComfyUI's VAE Decode decodes other latents",
    )
    scaled = state.from_samples(latent["samples"])
    batch, _, height, width = scaled.shape
    working = working_memory_bytes(batch * 64 * _tiles_pixels(height, width, tile_size), handle.dtype)
    with engine_errors(node), model_on_device(handle, working):

        def run(tile: int) -> torch.Tensor:
            return decode_latent(
                handle.model, scaled, tile_size=tile, progress=TileProgress(), should_cancel=interrupt_check
            )

        decoded = retry_with_smaller_tile(node, run, tile_size, full_size=max(height, width))
        image = finish_image(decoded, state.upscaled_lq, state.output_size, color_fix)
    return image_from_engine(image)


class FiDeSREncode:
    DISPLAY_NAME = ENCODE_NODE
    DESCRIPTION = (
        "Upscales the low-quality image (bicubic, as the authors prepare it) and encodes it with the SD 2.1 VAE. "
        "The LATENT is an ordinary SD 2.1 latent that also carries what the later FiDeSR nodes need."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The LQ latent z_L with its FiDeSR state: connect it to FiDeSR One-Step U-Net.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": MODEL_INPUT,
                "image": LQ_IMAGE_INPUT,
                "upscale_by": UPSCALE_BY_INPUT,
                "latent_mode": LATENT_MODE_INPUT,
                "seed": SEED_INPUT,
                "tile_size": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 0,
                        "max": 8192,
                        "step": 64,
                        "tooltip": "VAE encoder tile in pixels of the upscaled image (the authors use 1024); 0 "
                        "encodes it in one piece. Halved once automatically when memory runs out.",
                    },
                ),
            }
        }

    def encode(
        self,
        model: FiDeSRModelHandle,
        image: torch.Tensor,
        upscale_by: float = 4.0,
        latent_mode: str = "sample",
        seed: int = 0,
        tile_size: int = 1024,
    ) -> tuple[dict[str, Any]]:
        latent = encode_step(
            model,
            image,
            upscale_by=upscale_by,
            latent_mode=latent_mode,
            seed=seed,
            tile_size=tile_size,
            node=self.DISPLAY_NAME,
        )
        return (latent,)


class FiDeSRDecode:
    DISPLAY_NAME = DECODE_NODE
    DESCRIPTION = (
        "Decodes a FiDeSR latent with the SD 2.1 VAE (tiled), corrects its colours against the upscaled input and "
        "resizes it to exactly upscale_by × the input size."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The restored, upscaled image.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": MODEL_INPUT,
                "latent": ("LATENT", {"tooltip": "A latent from a FiDeSR node (it carries the FiDeSR state)."}),
                "color_fix": COLOR_FIX_INPUT,
                "tile_size": (
                    "INT",
                    {
                        "default": 224,
                        "min": 0,
                        "max": 2048,
                        "step": 8,
                        "tooltip": "VAE decoder tile in latent pixels, 8 image pixels each (the authors use 224); 0 "
                        "decodes in one piece. Halved once automatically when memory runs out.",
                    },
                ),
            }
        }

    def decode(
        self, model: FiDeSRModelHandle, latent: dict[str, Any], color_fix: str = "adain", tile_size: int = 224
    ) -> tuple[torch.Tensor]:
        return (decode_step(model, latent, color_fix=color_fix, tile_size=tile_size, node=self.DISPLAY_NAME),)
