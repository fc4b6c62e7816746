"""Putting a base model and weights of any family together into one ``OneStepRestorer``: every LoRA merged
in float32 before the cast, PiSA-SR's pixel-only adapters, the prompt embedding (docs/algorithm.md §9).
"""

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


def _merge_set(network: nn.Module, lora_set: LoraSet, source: str, what: str, base: BaseModel) -> None:
    add_lora_adapters(
        network, lora_set.target_modules, rank=lora_set.rank, alpha=lora_set.alpha, init_lora_weights=False
    )
    try:
        load_lora_state(network, lora_set.state)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise WeightsFileError(
            f"{source}: the {what} does not fit the base model {base.source} ({message}); "
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


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str, base: BaseModel) -> None:
    try:
        module.load_state_dict({name: value.float() for name, value in state.items()})
    except RuntimeError as error:
        raise WeightsFileError(f"{source}: the {what} does not fit the base model {base.source} ({error})") from error


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
    recipe, lrrb, pixel_only = recipe_for(weights.family), None, ()
    source = weights.metadata.get("path", f"{recipe.name} weights")
    unet, vae = base.unet.float(), base.vae.float()
    if recipe.unet_output == "noise":
        recipe = dataclasses.replace(recipe, alpha_bar=sd21_alpha_bar(recipe.timestep))
    if weights.conv_in_state:  # before the U-Net LoRA, which conv_in carries too
        _load_state(unet.conv_in, weights.conv_in_state, "trained conv_in", source, base)
    labels = {s.part: s.label for s in LAYOUTS[weights.family].sets}
    for part, lora_set in weights.lora.items():
        _merge_set(vae if part == "vae_encoder" else unet, lora_set, source, labels[part], base)
    if weights.family == "pisa-sr":
        pixel_only = _add_negated_semantic_set(unet, weights.lora["semantic"])
    if weights.lrrb_state:
        lrrb = LRRB(latent_channels=unet.config.in_channels)
        _load_state(lrrb, weights.lrrb_state, "LRRB", source, base)
        lrrb = lrrb.float().eval().requires_grad_(False).to(target_device)
    memory_format = torch.channels_last if use_channels_last(target_device, dtype) else torch.contiguous_format
    for network in (unet, vae):  # nn.Module.to: diffusers' own warns of fp32 modules that SD 2.1 does not have
        nn.Module.to(network, device=target_device, dtype=dtype, memory_format=memory_format)
        network.eval().requires_grad_(False)
    ranks = [f"{labels[part].split(' LoRA')[0]} {lora_set.rank}" for part, lora_set in weights.lora.items()]
    description = {
        "family": recipe.name,
        "base": base.source,
        "base_kind": base.kind,
        "weights": source,
        "lora_rank": str(weights.lora["unet"].rank) if len(ranks) == 1 else ", ".join(ranks),
        "precision": dtype_name(dtype),
        "device": str(target_device),
    }
    return OneStepRestorer(
        unet=unet,
        vae=vae,
        lrrb=lrrb,
        prompt_embedding=embedding.to(target_device),
        dtype=dtype,
        description=description,
        recipe=recipe,
        pixel_only_adapters=pixel_only,
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
