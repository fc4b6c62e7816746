"""FiDeSR One-Step U-Net (the LoRA U-Net's one step, every family) and FiDeSR LRRB Refine (FiDeSR's LRRB).

Each loads only its own network; ``chain`` checks the stage order and the model's family.
"""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.v0_0_2 import io

from ..fidesr_core.pipeline import refine_stage, residual_stage
from ..fidesr_core.settings import UpscaleSettings
from .chain import NODE_OF_STAGE, check_stage, latent_of_state, state_of_latent
from .errors import engine_errors, node_error
from .inputs import latent_output, schema, shared_inputs
from .model_handle import FiDeSRModelHandle, require_handle
from .runtime import ComfyRuntime

ENCODE_NODE, RESIDUAL_NODE, REFINE_NODE = (NODE_OF_STAGE[stage] for stage in ("encode", "residual", "refine"))


def prompt_embedding_from_conditioning(
    positive: Any, handle: FiDeSRModelHandle, batch: int, node: str
) -> torch.Tensor | None:
    """The ``[1 or B, tokens, dim]`` text embedding of a CONDITIONING, checked against the U-Net."""
    if positive is None:
        return None
    if not isinstance(positive, list) or not positive or not isinstance(positive[0], (list, tuple)):
        raise node_error(node, "positive must be a CONDITIONING, e.g. from CLIP Text Encode")
    if len(positive) > 1:
        raise node_error(
            node,
            f"positive holds {len(positive)} conditionings (e.g. from Conditioning Combine); the U-Net takes one: "
            "connect a single CLIP Text Encode (Conditioning Concat is fine)",
        )
    embedding = positive[0][0]
    expected = handle.cross_attention_dim
    if not isinstance(embedding, torch.Tensor) or embedding.ndim != 3 or embedding.shape[-1] != expected:
        shape = list(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise node_error(
            node,
            f"positive is a {shape} embedding but this U-Net expects [batch, tokens, {expected}]; use the CLIP of "
            "the same Stable Diffusion 2.1 model (e.g. Load Checkpoint with v2-1_512-ema-pruned.safetensors)",
        )
    if embedding.shape[0] not in (1, batch):
        raise node_error(
            node, f"positive has a batch of {embedding.shape[0]} but the latent has {batch}; use 1 or {batch}"
        )
    return embedding.detach().float()


class FiDeSRResidual(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "FiDeSRResidual",
            RESIDUAL_NODE,
            "The one diffusion step of the LoRA-tuned SD 2.1 U-Net, tiled for large images. FiDeSR "
            "and PiSA-SR: the U-Net at timestep 1 predicts the residual r of the LQ latent z_L; OSEDiff: it predicts "
            "noise at timestep 999 and one DDPM step gives the clean latent x0, r = z_L − x0. PiSA-SR's "
            "pixel/semantic strengths pick its default or adjustable mode. Outputs z_L − r.",
            [
                *shared_inputs("model"),
                io.Latent.Input("latent", tooltip=f"The output of {ENCODE_NODE}."),
                *shared_inputs("tile_size", "tile_overlap", "positive", "pixel_strength", "semantic_strength"),
            ],
            [
                latent_output(
                    "z_L − r, with the residual recorded: connect it to FiDeSR LRRB Refine (FiDeSR; the other "
                    "families pass it unchanged) or to the LF/HF injections."
                )
            ],
        )

    @classmethod
    def execute(
        cls, model: FiDeSRModelHandle, latent: dict[str, Any], positive: Any = None, **settings: Any
    ) -> io.NodeOutput:
        """``settings``: the other inputs, each named as its field of ``UpscaleSettings``."""
        node = RESIDUAL_NODE
        handle = require_handle(model, node)
        state = state_of_latent(latent, node, connect_to=ENCODE_NODE)
        check_stage(state, "residual", handle.recipe)
        embedding = prompt_embedding_from_conditioning(positive, handle, state.latents.z_lq.shape[0], node)
        with engine_errors(node):
            settings = UpscaleSettings(**settings)
            runtime = ComfyRuntime(handle=handle)
            latents = residual_stage(handle.model, state.latents, settings, runtime, prompt_embedding=embedding)
        return io.NodeOutput(latent_of_state(state.after("residual", latents), base=latent))


class FiDeSRRefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "FiDeSRRefine",
            REFINE_NODE,
            "FiDeSR's Latent Residual Refinement Block: a small network corrects the U-Net residual from "
            "the LQ latent and the residual. Outputs z_L − (r + Δr). PiSA-SR and OSEDiff have no LRRB: their latent "
            "passes through unchanged, so one chain serves all three.",
            [
                *shared_inputs("model"),
                io.Latent.Input(
                    "latent",
                    tooltip=f"The output of {RESIDUAL_NODE}. A PiSA-SR or OSEDiff latent passes through unchanged "
                    "(those models have no LRRB).",
                ),
            ],
            [
                latent_output(
                    "The restored latent z_L − (r + Δr) (FiDeSR; the other families' latent as it came): connect "
                    "it to the LF/HF injections or to the decoder."
                )
            ],
        )

    @classmethod
    def execute(cls, model: FiDeSRModelHandle, latent: dict[str, Any]) -> io.NodeOutput:
        node = REFINE_NODE
        handle = require_handle(model, node)
        state = state_of_latent(latent, node, connect_to=RESIDUAL_NODE)
        check_stage(state, "refine", handle.recipe)
        if state.recipe.uses_lrrb:  # PiSA-SR's and OSEDiff's latents pass unchanged
            with engine_errors(node):
                state = state.after("refine", refine_stage(handle.model, state.latents, ComfyRuntime(handle=handle)))
        return io.NodeOutput(latent_of_state(state, base=latent))
