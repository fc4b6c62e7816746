"""Putting a base model and weights of any family together into one ``OneStepRestorer`` (docs/algorithm.md §9):
every LoRA merged in float32 before the cast, PiSA-SR's pixel-only adapters, the prompt embedding."""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from ..errors import WeightsFileError
from ..networks.families import LoraSet, RestorerWeights, recipe_for
from ..networks.lora import add_lora_adapters, load_lora_state, merge_lora, negated_lora_state
from ..networks.lrrb import LRRB
from ..networks.model import BaseModel, OneStepRestorer
from ..networks.text_embedding import encode_token_ids
from ..precision import dtype_name, resolve_device, resolve_dtype
from .base_model import SD21_BASE_CONFIG_DIR, load_base_model
from .clip_tokenizer import prompt_ids
from .layouts import LAYOUTS
from .weights import load_restorer_weights

NEGATED_SUFFIX = "_negated"  # adapter names of PiSA-SR's sign-flipped semantic set


def sd21_alpha_bar(timestep: int) -> float:
    """``ᾱ_t`` of SD 2.1's DDPM schedule (scaled-linear betas 0.00085 → 0.012, 1000 steps), float32 as diffusers."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(str(SD21_BASE_CONFIG_DIR / "scheduler"))
    return float(scheduler.alphas_cumprod[timestep])


def prompt_embedding_for(base: BaseModel, family: str, prompt: str = "") -> torch.Tensor:
    """``[1, 77, dim]`` float32: the text encoder's embedding of the family's released prompt around ``prompt``,
    tokenized by ``base``'s tokenizer (a diffusers folder's own, else the bundled one)."""
    text = recipe_for(family).prompt_text(prompt)
    length = base.text_encoder.config.max_position_embeddings
    return encode_token_ids(base.text_encoder.float(), prompt_ids(text, base.tokenizer_dir, length=length))


def use_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """NHWC for half-precision convolutions on CUDA (tensor-core kernels want it) and for bf16 on CPU,
    where oneDNN's native bf16 kernels want it; fp32 on CPU stays NCHW (no reliable gain, see benchmarks/)."""
    return dtype != torch.float32 and (device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16))


def _merge_set(network: nn.Module, lora_set: LoraSet, source: str, what: str, base_source: str) -> None:
    add_lora_adapters(
        network, lora_set.target_modules, rank=lora_set.rank, alpha=lora_set.alpha, init_lora_weights=False
    )
    try:
        load_lora_state(network, lora_set.state)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise WeightsFileError(
            f"{source}: the {what} does not fit the base model {base_source} ({message}); "
            "it needs Stable Diffusion 2.1-base"
        ) from error
    try:
        merge_lora(network)
    except ValueError as error:
        raise WeightsFileError(f"{source}: merging the {what} gave non-finite weights ({error})") from error


def _add_negated_semantic_set(unet: nn.Module, semantic: LoraSet) -> tuple[str, ...]:
    renamed = {adapter: adapter + NEGATED_SUFFIX for adapter in semantic.target_modules}
    targets = {renamed[adapter]: modules for adapter, modules in semantic.target_modules.items()}
    add_lora_adapters(unet, targets, rank=semantic.rank, alpha=semantic.alpha, init_lora_weights=False)
    load_lora_state(unet, negated_lora_state(semantic.state, renamed))
    unet.disable_adapters()
    return tuple(name for name, modules in targets.items() if modules)


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str, base_source: str) -> None:
    try:
        module.load_state_dict({name: value.float() for name, value in state.items()})
    except RuntimeError as error:
        raise WeightsFileError(f"{source}: the {what} does not fit the base model {base_source} ({error})") from error


def assemble_restorer(
    base: BaseModel,
    weights: RestorerWeights,
    *,
    prompt: str = "",
    precision: str = "auto",
    device: str | torch.device | None = None,
) -> OneStepRestorer:
    """Merge the family's adapters into ``base`` (in place: ``base`` is consumed), compute the prompt
    embedding, cast and move.  ``prompt``: the user's text, built into the family's released prompt."""
    embedding = prompt_embedding_for(base, weights.family, prompt)
    target_device = resolve_device(device)
    dtype = resolve_dtype(precision, target_device)
    source = weights.metadata.get("path", f"{recipe_for(weights.family).name} weights")
    unet, pixel_only = base.unet.float(), ()
    if weights.conv_in_state:  # before the U-Net LoRA, which conv_in carries too
        _load_state(unet.conv_in, weights.conv_in_state, "trained conv_in", source, base.source)
    for part, lora_set in weights.lora.items():
        if part != "vae_encoder":
            _merge_set(unet, lora_set, source, _labels(weights)[part], base.source)
    if weights.family == "pisa-sr":
        pixel_only = _add_negated_semantic_set(unet, weights.lora["semantic"])
    _cast(unet, target_device, dtype)
    restorer = _restorer(weights, unet, base.vae, embedding, dtype, target_device, (base.source, base.kind))
    restorer.pixel_only_adapters = pixel_only
    return restorer


def restorer_on_unet(
    weights: RestorerWeights,
    unet: nn.Module,
    vae_state: dict[str, torch.Tensor],
    prompt_embedding: torch.Tensor,
    *,
    dtype: torch.dtype,
    device: torch.device,
    base_source: str,
    base_kind: str,
) -> OneStepRestorer:
    """A restorer whose U-Net another program runs with the family's U-Net weights applied (ComfyUI's MODEL), its
    VAE converted from the original-layout ``vae_state``; ``prompt_embedding``: ``[1, 77, dim]``."""
    from diffusers import AutoencoderKL

    # the converted VAE can share storage with ``vae_state``; a VAE LoRA is merged in place, never into the caller's
    own = "vae_encoder" in weights.lora
    renamed = {"first_stage_model." + key: value.clone() if own else value for key, value in vae_state.items()}
    common = {"config": str(SD21_BASE_CONFIG_DIR), "subfolder": "vae", "local_files_only": True}
    vae = AutoencoderKL.from_single_file(renamed, **common)
    return _restorer(weights, unet, vae, prompt_embedding.float(), dtype, device, (base_source, base_kind))


def _labels(weights: RestorerWeights) -> dict[str, str]:
    return {s.part: s.label for s in LAYOUTS[weights.family].sets}


def _cast(network: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    memory_format = torch.channels_last if use_channels_last(device, dtype) else torch.contiguous_format
    # nn.Module.to: diffusers' own warns of fp32 modules that SD 2.1 does not have
    nn.Module.to(network, device=device, dtype=dtype, memory_format=memory_format)
    network.eval().requires_grad_(False)


def _restorer(
    weights: RestorerWeights,
    unet: nn.Module,
    vae: nn.Module,
    embedding: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    base: tuple[str, str],
) -> OneStepRestorer:
    """The parts every restorer shares: the VAE (encoder LoRA merged, cast), the LRRB, recipe and description.
    ``base``: what the base came from and what kind of source that is, for messages."""
    (base_source, base_kind), recipe, lrrb, labels = base, recipe_for(weights.family), None, _labels(weights)
    source = weights.metadata.get("path", f"{recipe.name} weights")
    if recipe.unet_output == "noise":
        recipe = dataclasses.replace(recipe, alpha_bar=sd21_alpha_bar(recipe.timestep))
    vae = nn.Module.float(vae)  # diffusers' own .float() warns of fp32 modules that SD 2.1 does not have
    if "vae_encoder" in weights.lora:
        _merge_set(vae, weights.lora["vae_encoder"], source, labels["vae_encoder"], base_source)
    _cast(vae, device, dtype)
    if weights.lrrb_state:
        lrrb = LRRB(latent_channels=vae.config.latent_channels)
        _load_state(lrrb, weights.lrrb_state, "LRRB", source, base_source)
        lrrb = lrrb.float().eval().requires_grad_(False).to(device)
    ranks = [f"{labels[part].split(' LoRA')[0]} {lora_set.rank}" for part, lora_set in weights.lora.items()]
    description = {
        "family": recipe.name,
        "base": base_source,
        "base_kind": base_kind,
        "weights": source,
        "lora_rank": str(weights.lora["unet"].rank) if len(ranks) == 1 else ", ".join(ranks),
        "precision": dtype_name(dtype),
        "device": str(device),
    }
    return OneStepRestorer(
        unet=unet,
        vae=vae,
        lrrb=lrrb,
        prompt_embedding=embedding.to(device),
        dtype=dtype,
        description=description,
        recipe=recipe,
    )


def load_restorer(
    base_path: str | os.PathLike,
    weights_path: str | os.PathLike,
    *,
    prompt: str = "",
    precision: str = "auto",
    device: str | torch.device | None = None,
) -> OneStepRestorer:
    """SD 2.1-base (diffusers folder or single file) plus FiDeSR, PiSA-SR or OSEDiff weights (told by content)."""
    weights = load_restorer_weights(weights_path)
    weights.metadata.setdefault("path", str(weights_path))
    return assemble_restorer(load_base_model(base_path), weights, prompt=prompt, precision=precision, device=device)
