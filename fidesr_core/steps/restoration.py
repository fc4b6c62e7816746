"""The one-step restoration: U-Net residual at t = 1, then LRRB refinement (docs/algorithm.md §2.4–2.6)."""

from __future__ import annotations

import torch

from ..networks.model import FiDeSRModel
from ..networks.text_embedding import batch_prompt_embedding
from ..progress import CancelCheck, ProgressCallback
from .latent_tiling import run_tiled
from .row_strips import by_row_strips

__all__ = ["RESIDUAL_TIMESTEP", "predict_residual", "refine_residual", "restored_latent"]

RESIDUAL_TIMESTEP = 1
LRRB_HALO = 16  # latent rows: three dense blocks of five chained 3x3 convolutions see 15 rows each way


@torch.no_grad()
def predict_residual(
    model: FiDeSRModel,
    z_lq: torch.Tensor,
    *,
    prompt_embedding: torch.Tensor | None = None,
    tile_size: int = 96,
    tile_overlap: int = 32,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """``r = U-Net(z_L, t=1, prompt)`` ``[B, 4, h, w]`` float32, tiled over the latent when large.

    ``prompt_embedding`` (``[1 or B, 77, dim]``) defaults to the model's empty-prompt embedding.
    """
    embedding = model.prompt_embedding if prompt_embedding is None else prompt_embedding
    expected_dim = model.unet.config.cross_attention_dim
    if embedding.shape[-1] != expected_dim:
        raise ValueError(
            f"prompt embedding width {embedding.shape[-1]} does not fit this U-Net (expects {expected_dim}); "
            "use a text encoder of the same Stable Diffusion 2.x model"
        )
    embedding = batch_prompt_embedding(embedding, z_lq.shape[0]).to(device=model.device, dtype=model.dtype)
    timestep = torch.tensor(RESIDUAL_TIMESTEP, device=model.device)

    def unet_tile(tile: torch.Tensor) -> torch.Tensor:
        tile = tile.to(device=model.device, dtype=model.dtype)
        return model.unet(tile, timestep, encoder_hidden_states=embedding).sample

    return run_tiled(
        unet_tile,
        z_lq.float().to(model.device),
        tile_size=tile_size,
        overlap=tile_overlap,
        progress=progress,
        should_cancel=should_cancel,
    )


@torch.no_grad()
def refine_residual(model: FiDeSRModel, z_lq: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``r̃ = r + LRRB(cat[z_L, r])`` on the whole (stitched) latent, float32.

    The released code runs the LRRB per U-Net tile; running it once on the
    stitched residual makes tiled and untiled results agree (identical when
    no tiling happens).
    """
    device = next(model.lrrb.parameters()).device
    z_lq, residual = z_lq.float().to(device), residual.float().to(device)
    # in strips of latent rows: the same numbers, without 192-channel maps of the whole latent
    correction = by_row_strips(model.lrrb, torch.cat([z_lq, residual], dim=1), halo=LRRB_HALO, elements=1 << 18)
    return residual + correction.float()


def restored_latent(z_lq: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """``z = z_L − r̃``: plain subtraction, no scheduler step (docs/algorithm.md §2.5)."""
    return z_lq.float() - refined.float()
