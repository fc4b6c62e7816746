"""The one-step restoration: the U-Net's residual, then (FiDeSR) LRRB refinement (docs/algorithm.md §2.4–2.6, §9).

Every family restores ``z = z_L − r``; ``predict_residual`` returns that ``r`` for all three (OSEDiff's from
its predicted noise, ``r = z_L − x0``).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from ..errors import SettingsError
from ..networks.lora import adapters_switched_on
from ..networks.model import OneStepRestorer
from ..networks.text_embedding import batch_prompt_embedding
from ..progress import CancelCheck, ProgressCallback
from .latent_tiling import run_tiled
from .row_strips import by_row_strips

RESIDUAL_TIMESTEP = 1  # FiDeSR's and PiSA-SR's
LRRB_HALO = 16  # latent rows: three dense blocks of five chained 3x3 convolutions see 15 rows each way
logger = logging.getLogger(__name__)


def unet_passes(model: OneStepRestorer, pixel: float | None, semantic: float | None) -> list[tuple[float, bool]]:
    """The U-Net passes as ``(weight, pixel_only)``, summed: one for every family but PiSA-SR's adjustable mode.

    ``λ_pix·ε_pix + λ_sem·(ε_both − ε_pix) = (λ_pix − λ_sem)·ε_pix + λ_sem·ε_both``: one pass when
    ``λ_pix = λ_sem`` (both at 1 is the default mode's pass itself) or ``λ_sem = 0``, two otherwise.
    Whole passes, not tile by tile: a U-Net run by ComfyUI switches its LoRA sets by re-patching weights.
    """
    if not model.pixel_only_adapters:
        if pixel is not None or semantic is not None:
            logger.debug("%s has one LoRA set: pixel/semantic strengths do not apply", model.recipe.name)
        return [(1.0, False)]
    pixel, semantic = 1.0 if pixel is None else pixel, 1.0 if semantic is None else semantic
    if pixel == semantic:
        return [(semantic, False)]
    if semantic == 0.0:
        return [(pixel, True)]
    return [(pixel - semantic, True), (semantic, False)]


def _pass_progress(progress: ProgressCallback | None, index: int, passes: int) -> ProgressCallback | None:
    if progress is None or passes == 1:
        return progress
    return lambda done, total: progress(index * total + done, passes * total)


@torch.no_grad()
def predict_residual(
    model: OneStepRestorer,
    z_lq: torch.Tensor,
    *,
    prompt_embedding: torch.Tensor | None = None,
    tile_size: int = 96,
    tile_overlap: int = 32,
    pixel_strength: float | None = None,
    semantic_strength: float | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The residual ``r`` (``z = z_L − r``) ``[B, 4, h, w]`` float32, the U-Net tiled over the latent when large.

    ``prompt_embedding`` (``[1 or B, 77, dim]``) defaults to the model's own.  The strengths are PiSA-SR's
    (``unet_passes``; one alone leaves the other at 1).  ``device`` defaults to the U-Net weights' (a memory
    manager that keeps part of them elsewhere names it).
    """
    device = device or model.device
    embedding = model.prompt_embedding if prompt_embedding is None else prompt_embedding
    expected_dim = model.prompt_embedding.shape[-1]  # the width of the U-Net's cross-attention
    if embedding.shape[-1] != expected_dim:
        raise ValueError(
            f"prompt embedding width {embedding.shape[-1]} does not fit this U-Net (expects {expected_dim}); "
            "use a text encoder of the same Stable Diffusion 2.x model"
        )
    recipe = model.recipe
    embedding = batch_prompt_embedding(embedding, z_lq.shape[0]).to(device=device, dtype=model.dtype)
    timestep = torch.tensor(recipe.timestep, device=device)

    def unet_tile(tile: torch.Tensor) -> torch.Tensor:
        tile = tile.to(device=device, dtype=model.dtype)
        return model.unet(tile, timestep, encoder_hidden_states=embedding, return_dict=False)[0]

    z_lq = z_lq.float().to(device)
    passes = unet_passes(model, pixel_strength, semantic_strength)
    output = None
    for index, (weight, pixel_only) in enumerate(passes):
        with adapters_switched_on(model.unet) if pixel_only else nullcontext():
            predicted = run_tiled(
                unet_tile,
                z_lq,
                tile_size=tile_size,
                overlap=tile_overlap,
                square_tiles=recipe.square_tiles,
                weight_row_shift=recipe.tile_weight_row_shift,
                progress=_pass_progress(progress, index, len(passes)),
                should_cancel=should_cancel,
            )
        predicted = predicted if weight == 1.0 else weight * predicted
        output = predicted if output is None else output + predicted
    if recipe.unet_output == "residual":
        return output
    if recipe.alpha_bar is None:
        raise SettingsError(f"{recipe.name}: the model has no noise schedule value ᾱ_{recipe.timestep}")
    # one DDPM step to t = 0 as diffusers computes it (float32): x0 = (z_L − √(1 − ᾱ)·ε) / √ᾱ, r = z_L − x0
    alpha = torch.tensor(recipe.alpha_bar, dtype=torch.float32, device=z_lq.device)
    return z_lq - (z_lq - (1 - alpha) ** 0.5 * output.float()) / alpha**0.5


@torch.no_grad()
def refine_residual(
    model: OneStepRestorer, z_lq: torch.Tensor, residual: torch.Tensor, *, device: torch.device | None = None
) -> torch.Tensor:
    """``r̃ = r + LRRB(cat[z_L, r])`` on the whole (stitched) latent, float32; ``r`` unchanged without an LRRB.

    The released code runs the LRRB per U-Net tile; once on the stitched residual, tiled and untiled results
    agree (identical when nothing is tiled).  ``device`` defaults to the LRRB's.
    """
    if model.lrrb is None:
        return residual.float()
    device = device or next(model.lrrb.parameters()).device
    z_lq, residual = z_lq.float().to(device), residual.float().to(device)
    # in strips of latent rows: the same numbers, without 192-channel maps of the whole latent
    correction = by_row_strips(model.lrrb, torch.cat([z_lq, residual], dim=1), halo=LRRB_HALO, elements=1 << 18)
    return residual + correction.float()


def restored_latent(z_lq: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """``z = z_L − r̃``: plain subtraction, no scheduler step (docs/algorithm.md §2.5)."""
    return z_lq.float() - refined.float()
