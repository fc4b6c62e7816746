"""FiDeSR Upscale: the whole method in one node, one call of the engine's ``upscale``; it gives the chain
nodes' result bit for bit (with their defaults for what it does not expose).
"""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.v0_0_2 import io

from ..fidesr_core.pipeline import upscale
from ..fidesr_core.settings import HighFrequencySettings, LowFrequencySettings, UpscaleSettings
from .errors import engine_errors
from .images import image_from_engine, image_to_engine
from .inputs import image_output, number_input, schema, shared_inputs
from .model_handle import FiDeSRModelHandle, require_handle
from .restoration_nodes import prompt_embedding_from_conditioning
from .runtime import ComfyRuntime

UPSCALE_NODE = "FiDeSR Upscale"


def _strength_input(name: str, branch: str) -> io.Input:
    return number_input(
        *(name, 0.1, 0.0, 2.0, 0.01),
        f"Effective strength of the training-free {branch} injection; 0 turns it off. LF 0.1 + HF 0.1 "
        "equals the authors' script defaults.",
    )


class FiDeSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "FiDeSRUpscale",
            UPSCALE_NODE,
            "One-step super-resolution in one node, with the model from Load FiDeSR Model: FiDeSR (LoRA "
            "U-Net residual, LRRB refinement), PiSA-SR (pixel and semantic LoRA sets, adjustable strengths) or "
            "OSEDiff (one DDPM step), then training-free LF/HF frequency injection and colour correction. Same "
            "result as the chain of FiDeSR VAE Encode, One-Step U-Net, LRRB Refine, LF Injection, HF Injection and "
            "VAE Decode.",
            [
                *shared_inputs("model", "image", "upscale_by"),
                _strength_input("lf_strength", "low-frequency (structure)"),
                _strength_input("hf_strength", "high-frequency (detail)"),
                *shared_inputs("color_fix", "latent_mode", "seed", "tile_size", "tile_overlap"),
                *shared_inputs("positive", "pixel_strength", "semantic_strength"),
            ],
            [image_output("The restored, upscaled image.")],
        )

    @classmethod
    def execute(
        cls,
        model: FiDeSRModelHandle,
        image: torch.Tensor,
        lf_strength: float = 0.1,
        hf_strength: float = 0.1,
        positive: Any = None,
        **settings: Any,
    ) -> io.NodeOutput:
        """``settings``: the other inputs, each named as its field of ``UpscaleSettings``."""
        node = UPSCALE_NODE
        handle = require_handle(model, node)
        pixels = image_to_engine(image, node)
        embedding = prompt_embedding_from_conditioning(positive, handle, pixels.shape[0], node)
        with engine_errors(node):
            lf, hf = LowFrequencySettings(strength=lf_strength), HighFrequencySettings(strength=hf_strength)
            settings, runtime = UpscaleSettings(**settings, lf=lf, hf=hf), ComfyRuntime(handle=handle)
            result = upscale(handle.model, pixels, settings, prompt_embedding=embedding, runtime=runtime)
        return io.NodeOutput(image_from_engine(result))
