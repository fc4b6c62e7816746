"""Test helper: the authors' FiDeSR checkpoint dict, built on the tiny U-Net, and its FiDeSRWeights twin.

Shared by the weights tests (test_weights.py, test_weights_refusals.py). The key
names are spelled out here, the way the released trainer's ``save_model`` writes
them (docs/algorithm.md §5, §6), rather than taken from the module under test.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from fidesr_core.networks.lora import add_lora_adapters, lora_target_modules
from fidesr_core.networks.lrrb import LRRB
from fidesr_core.networks.model import FiDeSRWeights
from fidesr_core.networks.tiny import TINY_UNET_CONFIG

__all__ = ["RANK", "authors_checkpoint", "weights_from_checkpoint"]

RANK = 4


def _randomise(module: torch.nn.Module, names: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if names in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def authors_checkpoint(seed: int = 1) -> dict:
    """The dict the released trainer's ``save_model`` writes, built the same way on the tiny U-Net."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    targets = lora_target_modules(unet)
    add_lora_adapters(unet, targets, rank=RANK)
    _randomise(unet, "lora", seed)  # gaussian init leaves lora_B at zero: make every tensor count
    lrrb = LRRB()
    _randomise(lrrb, "", seed + 1)
    return {
        "unet_lora_encoder_modules": targets["default_encoder"],
        "unet_lora_decoder_modules": targets["default_decoder"],
        "unet_lora_others_modules": targets["default_others"],
        "lora_rank_unet": RANK,
        "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k},
        "lrrb_state_dict": lrrb.state_dict(),
    }


def weights_from_checkpoint(authors: dict) -> FiDeSRWeights:
    """The same content as ``authors`` as a FiDeSRWeights, with copied tensors and a little metadata."""
    return FiDeSRWeights(
        lora_rank=authors["lora_rank_unet"],
        target_modules={
            "default_encoder": list(authors["unet_lora_encoder_modules"]),
            "default_decoder": list(authors["unet_lora_decoder_modules"]),
            "default_others": list(authors["unet_lora_others_modules"]),
        },
        unet_lora_state={k: v.clone() for k, v in authors["state_dict_unet"].items()},
        lrrb_state={k: v.clone() for k, v in authors["lrrb_state_dict"].items()},
        metadata={"source": "test", "training_step": "1200"},
    )
