"""Test helper: the authors' FiDeSR checkpoint dict, built on the tiny U-Net, and its RestorerWeights twin;
safetensors files re-written with a chosen header length.

Shared by the weights and base-model tests. The key
names are spelled out here, the way the released trainer's ``save_model`` writes
them (docs/algorithm.md §5, §6), rather than taken from the module under test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from fidesr_core.networks.families import LoraSet, RestorerWeights
from fidesr_core.networks.lora import add_lora_adapters, lora_target_modules
from fidesr_core.networks.lrrb import LRRB
from fidesr_core.networks.tiny import TINY_UNET_CONFIG

__all__ = ["RANK", "authors_checkpoint", "weights_from_checkpoint", "with_header_length_low_byte"]

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


def weights_from_checkpoint(authors: dict) -> RestorerWeights:
    """The same content as ``authors`` as FiDeSR RestorerWeights, with copied tensors and a little metadata."""
    lora = LoraSet(
        rank=authors["lora_rank_unet"],
        target_modules={
            "default_encoder": list(authors["unet_lora_encoder_modules"]),
            "default_decoder": list(authors["unet_lora_decoder_modules"]),
            "default_others": list(authors["unet_lora_others_modules"]),
        },
        state={k: v.clone() for k, v in authors["state_dict_unet"].items()},
    )
    return RestorerWeights(
        "fidesr",
        {"unet": lora},
        lrrb_state={k: v.clone() for k, v in authors["lrrb_state_dict"].items()},
        metadata={"source": "test", "training_step": "1200"},
    )


def with_header_length_low_byte(source: Path, target: Path, low_byte: int) -> Path:
    """A copy of the safetensors file ``source`` whose JSON header is padded with spaces (valid JSON, as
    safetensors' own writer pads) until its 8-byte length, the file's first byte on disk, ends in ``low_byte``."""
    data = source.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].rstrip(b" ")
    padded = len(header) + (low_byte - len(header)) % 256
    target.write_bytes(padded.to_bytes(8, "little") + header.ljust(padded, b" ") + data[8 + length :])
    return target
