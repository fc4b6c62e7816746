"""FiDeSR One-Step U-Net (the LoRA U-Net residual at t = 1) and FiDeSR LRRB Refine."""

from __future__ import annotations

from typing import Any

import torch

from ..fidesr_core.steps.restoration import predict_residual, refine_residual
from .errors import engine_errors, node_error
from .inputs import CATEGORY, MODEL_INPUT, POSITIVE_INPUT, TILE_OVERLAP_INPUT, TILE_SIZE_INPUT
from .latent_state import (
    ENCODE_NODE,
    LF_NODE,
    REFINE_NODE,
    RESIDUAL_NODE,
    make_latent,
    read_state,
    require_residual,
)
from .model_handle import FiDeSRModelHandle, require_handle
from .runtime import (
    TileProgress,
    check_interrupted,
    interrupt_check,
    lrrb_on_device,
    model_on_device,
    retry_with_smaller_tile,
    working_memory_bytes,
)

__all__ = ["FiDeSRResidual", "FiDeSRRefine", "residual_step", "refine_step", "prompt_embedding_from_conditioning"]


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
    return embedding.detach().to(device="cpu", dtype=torch.float32)


def _overlap_for(tile: int, tile_size: int, tile_overlap: int) -> int:
    """Keep the overlap's share of the tile when the tile is halved after running out of memory."""
    if tile == tile_size:
        return tile_overlap
    if tile_size > 0:
        return tile_overlap * tile // tile_size
    return min(tile_overlap, tile // 3)


def residual_step(
    handle: FiDeSRModelHandle,
    latent: Any,
    *,
    tile_size: int,
    tile_overlap: int,
    positive: Any = None,
    node: str,
) -> dict[str, Any]:
    """samples − r (unscaled); the state records ``r``."""
    handle = require_handle(handle, node)
    state = read_state(latent, node, connect_to=ENCODE_NODE)
    if state.residual is not None:
        raise node_error(
            node, f"the latent already went through {RESIDUAL_NODE}; connect the output of {ENCODE_NODE} instead"
        )
    if tile_size > 0 and not 0 <= tile_overlap < tile_size:
        raise node_error(node, f"tile_overlap {tile_overlap} must be smaller than tile_size {tile_size}")
    batch, _, height, width = state.z_lq.shape
    embedding = prompt_embedding_from_conditioning(positive, handle, batch, node)
    tile_pixels = min(height, tile_size) * min(width, tile_size) if tile_size > 0 else height * width
    working = working_memory_bytes(batch * 64 * tile_pixels, handle.dtype)
    with engine_errors(node), model_on_device(handle, working):

        def run(tile: int) -> torch.Tensor:
            return predict_residual(
                handle.model,
                state.z_lq,
                prompt_embedding=embedding,
                tile_size=tile,
                tile_overlap=_overlap_for(tile, tile_size, tile_overlap),
                progress=TileProgress(),
                should_cancel=interrupt_check,
            )

        residual = retry_with_smaller_tile(node, run, tile_size, full_size=max(height, width))
    samples = latent["samples"] - state.to_samples(residual)
    return make_latent(samples, state.with_residual(residual), base=latent)


def refine_step(handle: FiDeSRModelHandle, latent: Any, *, node: str) -> dict[str, Any]:
    """samples − Δr (unscaled); the state records ``r + Δr``."""
    handle = require_handle(handle, node)
    state = read_state(latent, node, connect_to=RESIDUAL_NODE)
    require_residual(state, node)
    if state.refined_residual is not None:
        raise node_error(
            node, f"the latent already went through {REFINE_NODE}; connect the output of {RESIDUAL_NODE} instead"
        )
    if state.injections:
        raise node_error(
            node,
            f"the latent already has frequency injection applied; put {REFINE_NODE} before {LF_NODE} and the "
            "HF injection",
        )
    check_interrupted()
    with engine_errors(node), lrrb_on_device(handle):
        refined = refine_residual(handle.model, state.z_lq, state.residual)
    correction = refined.cpu() - state.residual  # Δr
    samples = latent["samples"] - state.to_samples(correction)
    return make_latent(samples, state.with_refined_residual(refined), base=latent)


class FiDeSRResidual:
    DISPLAY_NAME = RESIDUAL_NODE
    DESCRIPTION = (
        "The one diffusion step: the LoRA-tuned SD 2.1 U-Net at timestep 1 predicts the residual r of the LQ latent "
        "(tiled for large images). Outputs z_L − r."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("z_L − r, with the residual recorded: connect it to FiDeSR LRRB Refine.",)
    FUNCTION = "predict"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": MODEL_INPUT,
                "latent": ("LATENT", {"tooltip": f"The output of {ENCODE_NODE}."}),
                "tile_size": TILE_SIZE_INPUT,
                "tile_overlap": TILE_OVERLAP_INPUT,
            },
            "optional": {"positive": POSITIVE_INPUT},
        }

    def predict(
        self,
        model: FiDeSRModelHandle,
        latent: dict[str, Any],
        tile_size: int = 96,
        tile_overlap: int = 32,
        positive: Any = None,
    ) -> tuple[dict[str, Any]]:
        result = residual_step(
            model, latent, tile_size=tile_size, tile_overlap=tile_overlap, positive=positive, node=self.DISPLAY_NAME
        )
        return (result,)


class FiDeSRRefine:
    DISPLAY_NAME = REFINE_NODE
    DESCRIPTION = (
        "The Latent Residual Refinement Block: a small network corrects the U-Net residual from the LQ latent and "
        "the residual. Outputs z_L − (r + Δr)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The restored latent z_L − (r + Δr): connect it to the LF/HF injections or to the decoder.",)
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": MODEL_INPUT,
                "latent": ("LATENT", {"tooltip": f"The output of {RESIDUAL_NODE}."}),
            }
        }

    def refine(self, model: FiDeSRModelHandle, latent: dict[str, Any]) -> tuple[dict[str, Any]]:
        return (refine_step(model, latent, node=self.DISPLAY_NAME),)
