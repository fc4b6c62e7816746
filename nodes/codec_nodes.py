"""FiDeSR VAE Encode (the released script's preparation of the LQ image, then the VAE) and FiDeSR VAE Decode
(the VAE, the colour fix, the resize to exactly ``upscale_by`` × the input).  Both load only the VAE.
"""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.v0_0_2 import io

from ..fidesr_core.pipeline import decode_stage, encode_stage
from ..fidesr_core.settings import UpscaleSettings
from .chain import NODE_OF_STAGE, ChainState, latent_of_state, state_of_latent
from .errors import engine_errors
from .images import image_from_engine, image_to_engine
from .inputs import image_output, latent_output, number_input, schema, shared_inputs
from .model_handle import FiDeSRModelHandle, require_handle
from .runtime import ComfyRuntime

ENCODE_NODE, DECODE_NODE = NODE_OF_STAGE["encode"], NODE_OF_STAGE["decode"]


class FiDeSREncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "FiDeSREncode",
            ENCODE_NODE,
            "Upscales the low-quality image (bicubic, as the authors prepare it) and encodes it with the "
            "SD 2.1 VAE (OSEDiff: with its encoder LoRA). The LATENT is an ordinary SD 2.1 latent that also carries "
            "what the later FiDeSR nodes need, including which family encoded it (the later nodes need the same "
            "model).",
            [
                *shared_inputs("model", "image", "upscale_by", "latent_mode", "seed"),
                number_input(
                    *("tile_size", 1024, 0, 8192, 64),
                    "VAE encoder tile in pixels of the upscaled image (the authors use 1024); 0 encodes it in one "
                    "piece. Halved automatically when memory runs out.",
                    kind=io.Int,
                ),
            ],
            [latent_output("The LQ latent z_L with its FiDeSR state: connect it to FiDeSR One-Step U-Net.")],
        )

    @classmethod
    def execute(
        cls, model: FiDeSRModelHandle, image: torch.Tensor, tile_size: int = 1024, **settings: Any
    ) -> io.NodeOutput:
        """``settings``: the other inputs, each named as its field of ``UpscaleSettings``."""
        node = ENCODE_NODE
        handle = require_handle(model, node)
        pixels = image_to_engine(image, node)
        with engine_errors(node):
            settings = UpscaleSettings(**settings, encode_tile_size=tile_size)
            latents = encode_stage(handle.model, pixels, settings, ComfyRuntime(handle=handle))
        state = ChainState.encoded(latents, handle.recipe, handle.model.scaling_factor)
        return io.NodeOutput(latent_of_state(state))


class FiDeSRDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "FiDeSRDecode",
            DECODE_NODE,
            "Decodes a FiDeSR latent with the SD 2.1 VAE (tiled), corrects its colours against the "
            "upscaled input and resizes it to exactly upscale_by × the input size.",
            [
                *shared_inputs("model"),
                io.Latent.Input("latent", tooltip="A latent from a FiDeSR node (it carries the FiDeSR state)."),
                *shared_inputs("color_fix"),
                number_input(
                    *("tile_size", 224, 0, 2048, 8),
                    "VAE decoder tile in latent pixels, 8 image pixels each (the authors use 224); 0 decodes in one "
                    "piece. Halved automatically when memory runs out.",
                    kind=io.Int,
                ),
            ],
            [image_output("The restored, upscaled image.")],
        )

    @classmethod
    def execute(
        cls, model: FiDeSRModelHandle, latent: dict[str, Any], color_fix: str = "adain", tile_size: int = 224
    ) -> io.NodeOutput:
        node = DECODE_NODE
        handle = require_handle(model, node)
        state = state_of_latent(
            latent,
            node,
            connect_to="a FiDeSR node (VAE Encode, One-Step U-Net, LRRB Refine, LF/HF Injection); "
            "ComfyUI's VAE Decode decodes other latents",
        )
        with engine_errors(node):
            settings = UpscaleSettings(color_fix=color_fix, decode_tile_size=tile_size)
            runtime = ComfyRuntime(handle=handle)
            decoded = decode_stage(handle.model, state.latents, settings, runtime, latent=state.latent())
        return io.NodeOutput(image_from_engine(decoded))
