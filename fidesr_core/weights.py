"""FiDeSR weights: the LoRA adapters and the LRRB, independent of any file format."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["FiDeSRWeights"]


@dataclass(eq=False)
class FiDeSRWeights:
    """What a FiDeSR checkpoint holds (SPEC §6).

    ``target_modules`` maps adapter name (``default_encoder`` ...) to U-Net
    module names; ``unet_lora_state`` uses peft names such as
    ``down_blocks.0.attentions.0.proj_in.lora_A.default_encoder.weight``.
    """

    lora_rank: int
    target_modules: dict[str, list[str]]
    unet_lora_state: dict[str, torch.Tensor]
    lrrb_state: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
