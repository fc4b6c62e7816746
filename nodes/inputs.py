"""Inputs shared by several nodes (names, defaults and tooltips are user-facing API), and the nodes' schema."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..fidesr_core.settings import COLOR_FIX_METHODS, FILTER_GEOMETRIES, LATENT_MODES
from .model_handle import FIDESR_MODEL

CATEGORY = "image/upscaling/FiDeSR"
FiDeSRModelType = io.Custom(FIDESR_MODEL)
_STRENGTH_NOTE = (
    " 1 and 1 is PiSA-SR's default mode (one U-Net pass); other values run its adjustable mode (two passes). "
    "FiDeSR and OSEDiff have a single LoRA set and ignore both strengths."
)


def number_input(
    name: str, default: float, low: float, high: float, step: float, tooltip: str, *, kind=io.Float, **extra
) -> io.Input:
    """An Int (``kind=io.Int``) or Float input with its range."""
    return kind.Input(name, default=default, min=low, max=high, step=step, tooltip=tooltip, **extra)


def schema(node_id: str, display_name: str, description: str, inputs: list, outputs: list) -> io.Schema:
    """A FiDeSR node's schema (all in ``CATEGORY``)."""
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category=CATEGORY,
        description=description,
        inputs=inputs,
        outputs=outputs,
    )


def shared_inputs(*names: str) -> list[io.Input]:
    """The shared inputs called ``names``, in that order; made afresh, as ComfyUI builds a schema whenever it
    describes a node."""
    made = [
        FiDeSRModelType.Input(
            "model",
            tooltip="The restorer from Load FiDeSR Model or FiDeSR Model from Checkpoint (FiDeSR, PiSA-SR or "
            "OSEDiff weights).",
        ),
        io.Image.Input("image", tooltip="The low-quality image(s) to restore and upscale."),
        number_input(
            *("upscale_by", 4.0, 1.0, 16.0, 0.01),
            "Output size = upscale_by × input size. FiDeSR was trained for 4×. Images whose short side would "
            "end below 512 px are enlarged first and the result is resized back to exactly this factor.",
        ),
        io.Combo.Input(
            "latent_mode",
            options=list(LATENT_MODES),
            default="sample",
            tooltip="sample draws the VAE latent using the seed (the authors sample, unseeded); mode takes the "
            "posterior mean, which needs no seed.",
        ),
        io.Int.Input(
            "seed", default=0, min=0, max=2**64 - 1, tooltip="Seed of the VAE latent sample (latent_mode = sample)."
        ),
        io.Combo.Input(
            "color_fix",
            options=list(COLOR_FIX_METHODS),
            default="adain",
            tooltip="Colour correction towards the upscaled input: adain matches each channel's mean and std (the "
            "authors' default); wavelet keeps the result's detail and takes the input's low frequencies; none is off.",
        ),
        number_input(  # the U-Net's
            *("tile_size", 96, 0, 1024, 8),
            "U-Net tile in latent pixels, 8 image pixels each (the authors use 96). Latents larger than one "
            "tile are processed in overlapping tiles blended with a Gaussian; 0 never tiles. Halved automatically "
            "when memory runs out.",
            kind=io.Int,
        ),
        number_input(
            *("tile_overlap", 32, 0, 512, 8),
            "Overlap of neighbouring U-Net tiles in latent pixels (the authors use 32); must be smaller than tile_size.",
            kind=io.Int,
        ),
        io.Conditioning.Input(
            "positive",
            optional=True,
            tooltip="Optional prompt for the U-Net, e.g. CLIP Text Encode with the CLIP of Load Checkpoint "
            "(SD 2.1). Without it each model gets the prompt its authors ran it with: the empty prompt for FiDeSR "
            "and PiSA-SR, ', ,' for OSEDiff (its script encodes '<tags>, <prompt>,'; to keep that form, write "
            "', your words,').",
        ),
        number_input(
            *("pixel_strength", 1.0, 0.0, 3.0, 0.05),
            "PiSA-SR: weight of its pixel-level LoRA set (fidelity: lower noise and artefacts, closer to the "
            "input)." + _STRENGTH_NOTE,
            optional=True,
        ),
        number_input(
            *("semantic_strength", 1.0, 0.0, 3.0, 0.05),
            "PiSA-SR: weight of its semantic-level LoRA set (generated detail and texture on top of the pixel "
            "set; 0 leaves the pixel set alone)." + _STRENGTH_NOTE,
            optional=True,
        ),
        # the LF and HF injections'
        number_input(
            *("gamma", 1.2, 0.1, 10.0, 0.05),
            "Exponent applied to the spatial mask; larger values confine the injection to fewer places.",
        ),
        number_input(
            *("channel_tau", 0.8, 0.0, 1.0, 0.01),
            "Channel gate threshold: latent channels whose low-pass energy share is above it count as low-frequency "
            "ones.",
        ),
        number_input("channel_sharpness", 10.0, 0.0, 100.0, 0.1, "Channel gate sharpness (slope of its sigmoid)."),
        io.Combo.Input(
            "filter",
            options=list(FILTER_GEOMETRIES),
            default="official",
            tooltip="official reproduces the released code's Butterworth filter (orientation-selective; the weights "
            "were tuned with it); radial is the rotation-symmetric filter.",
        ),
    ]
    by_name = {made_input.id: made_input for made_input in made}
    return [by_name[name] for name in names]


# Outputs keep ComfyUI's generated ids: ComfyUI 0.3.x wants ids unique across inputs and outputs.
def image_output(tooltip: str) -> io.Output:
    return io.Image.Output(display_name="image", tooltip=tooltip)


def latent_output(tooltip: str) -> io.Output:
    return io.Latent.Output(display_name="latent", tooltip=tooltip)
