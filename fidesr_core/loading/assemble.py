"""Putting a base model and FiDeSR weights together into a ready ``FiDeSRModel``."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import WeightsFileError
from ..networks.lora import add_lora_adapters, load_lora_state, merge_lora
from ..networks.lrrb import LRRB
from ..networks.model import BaseModel, FiDeSRModel, FiDeSRWeights
from ..networks.text_embedding import encode_empty_prompt
from ..precision import dtype_name, resolve_device, resolve_dtype
from .base_model import load_base_model
from .weights import load_fidesr_weights

__all__ = ["assemble_fidesr_model", "load_fidesr_model", "use_channels_last", "place_networks"]


def use_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """NHWC for half-precision convolutions on CUDA (tensor-core kernels want it) and for bf16 on CPU,
    where oneDNN's native bf16 kernels want it; fp32 on CPU stays NCHW (no reliable gain, see benchmarks/)."""
    if dtype == torch.float32:
        return False
    return device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16)


def place_networks(
    unet: nn.Module, vae: nn.Module, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, nn.Module]:
    """Cast and move the U-Net and VAE (channels-last where it pays), frozen in eval mode."""
    memory_format = torch.channels_last if use_channels_last(device, dtype) else torch.contiguous_format
    # nn.Module.to, not diffusers' override: it warns about keeping modules in fp32 that SD 2.1 does not have.
    unet = nn.Module.to(unet, device=device, dtype=dtype, memory_format=memory_format)
    vae = nn.Module.to(vae, device=device, dtype=dtype, memory_format=memory_format)
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return unet, vae


def _apply_lora(base: BaseModel, weights: FiDeSRWeights, source: str) -> None:
    add_lora_adapters(
        base.unet, weights.target_modules, rank=weights.lora_rank, alpha=weights.lora_alpha, init_lora_weights=False
    )
    try:
        load_lora_state(base.unet, weights.unet_lora_state)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise WeightsFileError(
            f"{source}: the FiDeSR LoRA does not fit the base model {base.source} ({message}); "
            "FiDeSR weights need Stable Diffusion 2.1-base"
        ) from error
    try:
        merge_lora(base.unet)
    except ValueError as error:
        raise WeightsFileError(f"{source}: merging the LoRA gave non-finite weights ({error})") from error


def _build_lrrb(weights: FiDeSRWeights, latent_channels: int, source: str) -> LRRB:
    lrrb = LRRB(latent_channels=latent_channels)
    try:
        lrrb.load_state_dict(weights.lrrb_state)
    except RuntimeError as error:
        raise WeightsFileError(f"{source}: the LRRB tensors do not fit the LRRB architecture ({error})") from error
    return lrrb.float().eval().requires_grad_(False)


def assemble_fidesr_model(
    base: BaseModel,
    weights: FiDeSRWeights,
    *,
    precision: str = "auto",
    device: str | torch.device | None = None,
) -> FiDeSRModel:
    """Merge the LoRA into ``base.unet`` (in place: ``base`` is consumed), load the LRRB,
    compute the empty-prompt embedding, cast and move.

    Merging happens in float32 before the cast so half-precision models carry
    no extra rounding from the LoRA.
    """
    target_device = resolve_device(device)
    dtype = resolve_dtype(precision, target_device)
    source = weights.metadata.get("path", "FiDeSR weights")
    base.unet.float()
    _apply_lora(base, weights, source)
    lrrb = _build_lrrb(weights, base.unet.config.in_channels, source)
    prompt_embedding = encode_empty_prompt(base.text_encoder.float())
    unet, vae = place_networks(base.unet, base.vae, target_device, dtype)
    description = {
        "family": "FiDeSR",
        "base": base.source,
        "base_kind": base.kind,
        "weights": source,
        "lora_rank": str(weights.lora_rank),
        "precision": dtype_name(dtype),
        "device": str(target_device),
    }
    return FiDeSRModel(
        unet=unet,
        vae=vae,
        lrrb=lrrb.to(target_device),
        prompt_embedding=prompt_embedding.to(target_device),
        dtype=dtype,
        description=description,
    )


def load_fidesr_model(
    base_path: str | os.PathLike,
    weights_path: str | os.PathLike,
    *,
    precision: str = "auto",
    device: str | torch.device | None = None,
) -> FiDeSRModel:
    """Load SD 2.1-base (diffusers folder or single file) and FiDeSR weights (.pkl or .safetensors)."""
    weights = load_fidesr_weights(weights_path)
    weights.metadata.setdefault("path", str(weights_path))
    base = load_base_model(base_path)
    return assemble_fidesr_model(base, weights, precision=precision, device=device)
