"""The three one-step SD 2.1-base restorers (FiDeSR, PiSA-SR, OSEDiff): what differs per family
(``FamilyRecipe``, docs/algorithm.md §9) and what a checkpoint of each holds (``RestorerWeights``, §6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .lora import RELEASED_LORA_ALPHA

Family = Literal["fidesr", "pisa-sr", "osediff"]
FAMILY_NAMES: dict[str, str] = {"fidesr": "FiDeSR", "pisa-sr": "PiSA-SR", "osediff": "OSEDiff"}


@dataclass(frozen=True)
class FamilyRecipe:
    """How one family turns ``z_L`` into the restored latent (docs/algorithm.md §9)."""

    family: Family
    timestep: int
    unet_output: Literal["residual", "noise"]
    uses_lrrb: bool
    prompt_template: str = "{prompt}"  # the released script's prompt; {prompt}: the user's text ("" for none)
    square_tiles: bool = False  # the released tiler clamps a tile to the latent's short side on both axes (OSEDiff)
    tile_weight_row_shift: float = 0.0  # how far below (T − 1) / 2 the blend weight's row centre sits (OSEDiff: ½)
    alpha_bar: float | None = None  # ᾱ at timestep when the U-Net predicts noise (set on assembly from SD 2.1)

    @property
    def name(self) -> str:
        return FAMILY_NAMES[self.family]

    def prompt_text(self, prompt: str = "") -> str:
        """The text the released script encodes for the user's ``prompt`` (``""`` for none)."""
        return self.prompt_template.replace("{prompt}", prompt)


FIDESR_RECIPE = FamilyRecipe(family="fidesr", timestep=1, unet_output="residual", uses_lrrb=True)
PISA_SR_RECIPE = FamilyRecipe(family="pisa-sr", timestep=1, unet_output="residual", uses_lrrb=False)
# The released OSEDiff script encodes f"{tags}, {prompt}," with tags from a tagger we do not ship.
OSEDIFF_RECIPE = FamilyRecipe(
    family="osediff",
    timestep=999,
    unet_output="noise",
    uses_lrrb=False,
    prompt_template=", {prompt},",
    square_tiles=True,
    tile_weight_row_shift=0.5,
)
_RECIPES = {recipe.family: recipe for recipe in (FIDESR_RECIPE, PISA_SR_RECIPE, OSEDIFF_RECIPE)}


def recipe_for(family: str) -> FamilyRecipe:
    """The recipe of ``family`` ("fidesr", "pisa-sr" or "osediff")."""
    if family not in _RECIPES:
        raise ValueError(f"unknown restorer family {family!r}; expected one of {tuple(_RECIPES)}")
    return _RECIPES[family]


@dataclass(eq=False)
class LoraSet:
    """One set of LoRA adapters on one network, as the released code builds it; scale ``alpha / rank``."""

    rank: int
    target_modules: dict[str, list[str]]  # adapter name -> module names
    state: dict[str, torch.Tensor]  # peft-named tensors <module>.lora_A.<adapter>.weight / lora_B
    alpha: float = RELEASED_LORA_ALPHA  # the released files carry none; their code uses peft's default 8


@dataclass(eq=False)
class RestorerWeights:
    """What a checkpoint of one family holds (docs/algorithm.md §6, §9).  ``lora`` by part: FiDeSR ``unet``;
    PiSA-SR ``pixel`` and ``semantic`` (adapters ``default_*_pix`` / ``_sem``); OSEDiff ``unet`` and
    ``vae_encoder`` (one adapter, ``default_encoder``)."""

    family: Family
    lora: dict[str, LoraSet]
    lrrb_state: dict[str, torch.Tensor] = field(default_factory=dict)  # FiDeSR's LRRB
    conv_in_state: dict[str, torch.Tensor] = field(default_factory=dict)  # OSEDiff's conv_in, replaces the base's
    metadata: dict[str, str] = field(default_factory=dict)
    file_format: str = ""  # "pkl", "safetensors", or "" when built in memory
