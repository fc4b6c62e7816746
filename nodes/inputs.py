"""Input declarations shared by several FiDeSR nodes (names, defaults and tooltips are user-facing API)."""

from __future__ import annotations

from ..fidesr_core.steps.color_fix import COLOR_FIX_METHODS
from ..fidesr_core.steps.vae_codec import LATENT_MODES
from .model_handle import FIDESR_MODEL

__all__ = [
    "CATEGORY",
    "MODEL_INPUT",
    "LQ_IMAGE_INPUT",
    "UPSCALE_BY_INPUT",
    "LATENT_MODE_INPUT",
    "SEED_INPUT",
    "COLOR_FIX_INPUT",
    "TILE_SIZE_INPUT",
    "TILE_OVERLAP_INPUT",
    "POSITIVE_INPUT",
]

CATEGORY = "image/upscaling/FiDeSR"
LQ_IMAGE_INPUT = ("IMAGE", {"tooltip": "The low-quality image(s) to restore and upscale."})
MODEL_INPUT = (FIDESR_MODEL, {"tooltip": "The FiDeSR model from Load FiDeSR Model."})
MAX_SEED = 0xFFFFFFFFFFFFFFFF

UPSCALE_BY_INPUT = (
    "FLOAT",
    {
        "default": 4.0,
        "min": 1.0,
        "max": 16.0,
        "step": 0.01,
        "tooltip": "Output size = upscale_by × input size. FiDeSR was trained for 4×. Images whose short side would "
        "end below 512 px are enlarged first and the result is resized back to exactly this factor.",
    },
)
LATENT_MODE_INPUT = (
    list(LATENT_MODES),
    {
        "default": "sample",
        "tooltip": "sample draws the VAE latent using the seed (the authors sample, unseeded); mode takes the "
        "posterior mean, which needs no seed.",
    },
)
SEED_INPUT = (
    "INT",
    {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": "Seed of the VAE latent sample (latent_mode = sample)."},
)
COLOR_FIX_INPUT = (
    list(COLOR_FIX_METHODS),
    {
        "default": "adain",
        "tooltip": "Colour correction towards the upscaled input: adain matches each channel's mean and std (the "
        "authors' default); wavelet keeps the result's detail and takes the input's low frequencies; none is off.",
    },
)
TILE_SIZE_INPUT = (
    "INT",
    {
        "default": 96,
        "min": 0,
        "max": 1024,
        "step": 8,
        "tooltip": "U-Net tile in latent pixels, 8 image pixels each (the authors use 96). Latents larger than one "
        "tile are processed in overlapping tiles blended with a Gaussian; 0 never tiles. Halved once automatically "
        "when memory runs out.",
    },
)
TILE_OVERLAP_INPUT = (
    "INT",
    {
        "default": 32,
        "min": 0,
        "max": 512,
        "step": 8,
        "tooltip": "Overlap of neighbouring U-Net tiles in latent pixels (the authors use 32); must be smaller "
        "than tile_size.",
    },
)
POSITIVE_INPUT = (
    "CONDITIONING",
    {
        "tooltip": "Optional prompt for the U-Net, e.g. CLIP Text Encode with the CLIP of Load Checkpoint "
        "(SD 2.1). Without it the U-Net gets the empty prompt, as the authors ran it."
    },
)
