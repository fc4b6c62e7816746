"""Containers for the networks and their weights.  Reading and writing files lives in ``fidesr_core.loading``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .families import FIDESR_RECIPE, Family, FamilyRecipe
from .lrrb import LRRB

if TYPE_CHECKING:  # annotations only: importing diffusers/transformers takes seconds (ComfyUI start-up)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

SCALING_FACTOR = 0.18215  # SD 2.x VAE latent scale


@dataclass(eq=False)
class BaseModel:
    """Stable Diffusion 2.x parts FiDeSR builds on, as loaded (float32, CPU)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    source: str  # what it was loaded from, for messages
    kind: str  # e.g. "diffusers folder", "single file (.safetensors)", "tiny random"
    tokenizer_dir: str | None = None  # a diffusers folder's tokenizer/; None: the bundled CLIP tokenizer


@dataclass(eq=False)
class OneStepRestorer:
    """A one-step SD 2.1 restorer ready for inference: FiDeSR, PiSA-SR or OSEDiff (``recipe`` says which).
    The text encoder is not kept: the prompt embedding is computed once at load time."""

    # LoRA merged; or any module called as diffusers' U-Net is, ``unet(x, t, encoder_hidden_states=e,
    # return_dict=False)[0]``, whose enable/disable_adapters switch PiSA-SR's pixel-only pass (ComfyUI's MODEL)
    unet: UNet2DConditionModel
    vae: AutoencoderKL  # LoRA merged (OSEDiff's encoder LoRA)
    lrrb: LRRB | None  # FiDeSR's refinement block, None for the other families
    prompt_embedding: torch.Tensor  # [1, 77, cross_attention_dim], float32
    dtype: torch.dtype  # compute precision of the U-Net and VAE; the LRRB and frequency maths stay float32
    description: dict[str, str] = field(default_factory=dict)
    scaling_factor: float = SCALING_FACTOR
    recipe: FamilyRecipe = FIDESR_RECIPE
    # peft adapters that, switched on, take PiSA-SR's semantic LoRA back out of the merged U-Net (docs/algorithm.md §9)
    pixel_only_adapters: tuple[str, ...] = ()

    @property
    def family(self) -> Family:
        return self.recipe.family

    @property
    def device(self) -> torch.device:
        """Where the VAE's weights are (the U-Net's too, unless another program runs it)."""
        return next(self.vae.parameters()).device

    def to(self, device: torch.device | str) -> OneStepRestorer:
        """Move every network to ``device`` (in place) and return self."""
        device = torch.device(device)
        if self.device != device:
            for module in (self.unet, self.vae, self.lrrb):
                if module is not None:
                    module.to(device)
            self.prompt_embedding = self.prompt_embedding.to(device)
        return self
