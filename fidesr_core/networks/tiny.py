"""Tiny random SD 2-shaped models for tests, ``doctor`` and benchmarks: SD 2.1-base's block types, attention
layout, latent channels and ×8 VAE (so every code path runs) at a few hundred kilobytes of weights."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .families import LoraSet, RestorerWeights
from .lora import ADAPTER_NAMES, add_lora_adapters, lora_state_dict, lora_target_modules
from .lrrb import LRRB
from .model import BaseModel

TINY_UNET_CONFIG: dict = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 32), "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": (2, 4),
    "use_linear_projection": True, "norm_num_groups": 8,
}  # fmt: skip
TINY_VAE_CONFIG: dict = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
    "sample_size": 64, "scaling_factor": 0.18215,
}  # fmt: skip
TINY_TEXT_CONFIG: dict = {
    "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
    "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu",
}  # fmt: skip


def tiny_base_model(seed: int = 0) -> BaseModel:
    """A random SD 2-shaped base model (float32, CPU, eval mode), reproducible from ``seed``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)).eval()
    return BaseModel(unet, vae, text_encoder, source=f"tiny random (seed {seed})", kind="tiny random")


def _random_lora_set(
    network: torch.nn.Module, targets: dict[str, list[str]], rank: int, generator: torch.Generator, scale: float
) -> LoraSet:
    """Random non-zero LoRA tensors for ``targets``, shaped by adding those adapters to ``network`` (a scratch copy)."""
    add_lora_adapters(network, targets, rank=rank)
    state = {
        key: torch.randn(value.shape, generator=generator) * scale
        for key, value in lora_state_dict(network).items()
        if any(f".{adapter}." in key for adapter in targets)
    }
    return LoraSet(rank=rank, target_modules=targets, state=state)


def _unet_sets(base: BaseModel, suffixes: dict[str, str], rank: int, generator: torch.Generator, scale: float):
    """LoRA sets on a copy of ``base``'s U-Net by the released rule, one per ``part -> adapter suffix``."""
    unet = UNet2DConditionModel.from_config(base.unet.config)
    groups = lora_target_modules(unet)
    return {
        part: _random_lora_set(unet, {f"{a}{suffix}": groups[a] for a in ADAPTER_NAMES}, rank, generator, scale)
        for part, suffix in suffixes.items()
    }


def tiny_fidesr_weights(base: BaseModel, *, rank: int = 2, seed: int = 0, scale: float = 0.05) -> RestorerWeights:
    """Random FiDeSR weights for ``base``'s U-Net: non-zero LoRA A and B and a non-zero LRRB (``base`` untouched)."""
    generator = torch.Generator().manual_seed(seed)
    lora = _unet_sets(base, {"unet": ""}, rank, generator, scale)
    lrrb = LRRB(latent_channels=base.unet.config.in_channels)
    lrrb_state = {
        key: torch.randn(value.shape, generator=generator) * scale for key, value in lrrb.state_dict().items()
    }
    return RestorerWeights("fidesr", lora, lrrb_state=lrrb_state, metadata={"source": f"tiny random (seed {seed})"})


def tiny_pisa_sr_weights(base: BaseModel, *, rank: int = 2, seed: int = 0, scale: float = 0.05) -> RestorerWeights:
    """Random PiSA-SR weights for ``base``'s U-Net: a pixel and a semantic set (``base`` is left untouched)."""
    generator = torch.Generator().manual_seed(seed)
    lora = _unet_sets(base, {"pixel": "_pix", "semantic": "_sem"}, rank, generator, scale)
    return RestorerWeights("pisa-sr", lora, metadata={"source": f"tiny random (seed {seed})"})


def vae_encoder_lora_modules(vae: torch.nn.Module) -> list[str]:
    """The VAE modules OSEDiff's trainer puts its LoRA on: encoder convolutions and attention projections,
    and ``quant_conv`` (docs/algorithm.md §9); each named once."""
    patterns = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")
    modules = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        if ("encoder" in name and any(pattern in name for pattern in patterns)) or (
            "quant_conv" in name and "post_quant_conv" not in name
        ):
            modules.append(name.removesuffix(".weight"))
    return modules


def tiny_osediff_weights(base: BaseModel, *, rank: int = 2, seed: int = 0, scale: float = 0.05) -> RestorerWeights:
    """Random OSEDiff weights for ``base``: U-Net LoRA, a perturbed conv_in and a VAE encoder LoRA."""
    generator = torch.Generator().manual_seed(seed)
    conv_in = {
        name: value + torch.randn(value.shape, generator=generator) * scale
        for name, value in base.unet.conv_in.state_dict().items()
    }
    lora = _unet_sets(base, {"unet": ""}, rank, generator, scale)
    vae = AutoencoderKL.from_config(base.vae.config)
    targets = {"default_encoder": vae_encoder_lora_modules(vae)}
    lora["vae_encoder"] = _random_lora_set(vae, targets, rank, generator, scale)
    return RestorerWeights("osediff", lora, conv_in_state=conv_in, metadata={"source": f"tiny random (seed {seed})"})
