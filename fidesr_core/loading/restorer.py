"""Putting a base model and weights of any family together into one ``OneStepRestorer`` (docs/algorithm.md §9).

FiDeSR goes through ``loading.assemble``; PiSA-SR and OSEDiff are assembled here.  Every LoRA is
merged into its network in float32 before the cast, as for FiDeSR:

- PiSA-SR: the pixel set, then the semantic set (the released default mode).  For the adjustable
  mode the semantic set is added once more with its sign flipped as switched-off peft adapters,
  which, switched on, give the pixel-only U-Net without a second copy of it.
- OSEDiff: the trained ``conv_in`` replaces the base model's, the U-Net LoRA is merged on top
  (the released script runs it unmerged: float rounding apart, the same), and the VAE encoder
  LoRA is merged into the encoder (the decoder has none).

The prompt embedding is computed here, from the family's released prompt around the user's
``prompt`` (``""`` and ``", ,"`` need no tokenizer; other text uses ``loading.clip_tokenizer``).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from ..errors import WeightsFileError
from ..networks.families import OSEDIFF_RECIPE, PISA_SR_RECIPE, LoraSet, OSEDiffWeights, PiSASRWeights, recipe_for
from ..networks.lora import add_lora_adapters, load_lora_state, merge_lora, negated_lora_state
from ..networks.model import BaseModel, FiDeSRWeights, OneStepRestorer
from ..networks.text_embedding import encode_token_ids
from ..precision import dtype_name, resolve_device, resolve_dtype
from .assemble import assemble_fidesr_model, place_networks
from .base_model import SD21_BASE_CONFIG_DIR, load_base_model
from .clip_tokenizer import prompt_ids
from .family_weights import RestorerWeights, load_restorer_weights

__all__ = ["NEGATED_SUFFIX", "sd21_alpha_bar", "prompt_embedding_for", "assemble_restorer", "load_restorer"]

NEGATED_SUFFIX = "_negated"  # adapter names of PiSA-SR's sign-flipped semantic set


def sd21_alpha_bar(timestep: int) -> float:
    """``ᾱ_t`` of SD 2.1's DDPM schedule (scaled-linear betas 0.00085 → 0.012, 1000 steps), float32 as diffusers."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(str(SD21_BASE_CONFIG_DIR / "scheduler"))
    return float(scheduler.alphas_cumprod[timestep])


def prompt_embedding_for(
    base: BaseModel, family: str, prompt: str = "", *, tokenizer_source: str | os.PathLike | None = None
) -> torch.Tensor:
    """``[1, 77, dim]`` float32: the text encoder's embedding of the family's released prompt around ``prompt``.

    ``tokenizer_source``: the base model's path; its ``tokenizer/`` is used when it is a diffusers folder.
    """
    text = recipe_for(family).prompt_text(prompt)
    length = base.text_encoder.config.max_position_embeddings
    return encode_token_ids(base.text_encoder.float(), prompt_ids(text, base_path=tokenizer_source, length=length))


def _merge_set(network: nn.Module, lora_set: LoraSet, source: str, what: str, base: BaseModel) -> None:
    add_lora_adapters(
        network, lora_set.target_modules, rank=lora_set.rank, alpha=lora_set.alpha, init_lora_weights=False
    )
    try:
        load_lora_state(network, lora_set.state)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise WeightsFileError(
            f"{source}: {what} does not fit the base model {base.source} ({message}); it needs Stable Diffusion 2.1-base"
        ) from error
    try:
        merge_lora(network)
    except ValueError as error:
        raise WeightsFileError(f"{source}: merging {what} gave non-finite weights ({error})") from error


def _add_negated_semantic_set(unet: nn.Module, semantic: LoraSet) -> tuple[str, ...]:
    renamed = {adapter: adapter + NEGATED_SUFFIX for adapter in semantic.target_modules}
    targets = {renamed[adapter]: modules for adapter, modules in semantic.target_modules.items()}
    add_lora_adapters(unet, targets, rank=semantic.rank, alpha=semantic.alpha, init_lora_weights=False)
    load_lora_state(unet, negated_lora_state(semantic.state, renamed))
    unet.disable_adapters()
    return tuple(name for name, modules in targets.items() if modules)


def _load_conv_in(unet: nn.Module, conv_in: dict[str, torch.Tensor], source: str, base: BaseModel) -> None:
    expected = {name: tuple(value.shape) for name, value in unet.conv_in.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in conv_in.items()}
    if found != expected:
        raise WeightsFileError(
            f"{source}: the trained conv_in {found} does not fit the U-Net of {base.source} ({expected}); "
            "OSEDiff needs Stable Diffusion 2.1-base"
        )
    unet.conv_in.load_state_dict({name: value.float() for name, value in conv_in.items()})


def _description(base: BaseModel, name: str, source: str, ranks: str, device: torch.device, dtype: torch.dtype):
    return {
        "family": name,
        "base": base.source,
        "base_kind": base.kind,
        "weights": source,
        "lora_rank": ranks,
        "precision": dtype_name(dtype),
        "device": str(device),
    }


def assemble_restorer(
    base: BaseModel,
    weights: RestorerWeights,
    *,
    prompt: str = "",
    tokenizer_source: str | os.PathLike | None = None,
    precision: str = "auto",
    device: str | torch.device | None = None,
) -> OneStepRestorer:
    """Merge the family's adapters into ``base`` (in place: ``base`` is consumed), compute the prompt
    embedding, cast and move.  ``prompt``: the user's text, built into the family's released prompt."""
    if isinstance(weights, FiDeSRWeights):
        embedding = prompt_embedding_for(base, "fidesr", prompt, tokenizer_source=tokenizer_source) if prompt else None
        model = assemble_fidesr_model(base, weights, precision=precision, device=device)
        if embedding is not None:
            model.prompt_embedding = embedding.to(model.device)
        return model
    embedding = prompt_embedding_for(base, weights.family, prompt, tokenizer_source=tokenizer_source)
    target_device = resolve_device(device)
    dtype = resolve_dtype(precision, target_device)
    source = weights.metadata.get("path", f"{weights.family} weights")
    unet, vae = base.unet.float(), base.vae.float()
    pixel_only: tuple[str, ...] = ()
    if isinstance(weights, PiSASRWeights):
        _merge_set(unet, weights.pixel, source, "the pixel LoRA set", base)
        _merge_set(unet, weights.semantic, source, "the semantic LoRA set", base)
        pixel_only = _add_negated_semantic_set(unet, weights.semantic)
        recipe, ranks = PISA_SR_RECIPE, f"pixel {weights.pixel.rank}, semantic {weights.semantic.rank}"
    elif isinstance(weights, OSEDiffWeights):
        _load_conv_in(unet, weights.conv_in_state, source, base)
        _merge_set(unet, weights.unet_lora, source, "the U-Net LoRA", base)
        _merge_set(vae, weights.vae_lora, source, "the VAE encoder LoRA", base)
        recipe = dataclasses.replace(OSEDIFF_RECIPE, alpha_bar=sd21_alpha_bar(OSEDIFF_RECIPE.timestep))
        ranks = f"U-Net {weights.unet_lora.rank}, VAE encoder {weights.vae_lora.rank}"
    else:
        raise TypeError(f"expected FiDeSR, PiSA-SR or OSEDiff weights, got {type(weights).__name__}")
    unet, vae = place_networks(unet, vae, target_device, dtype)
    return OneStepRestorer(
        unet=unet,
        vae=vae,
        lrrb=None,
        prompt_embedding=embedding.to(target_device),
        dtype=dtype,
        description=_description(base, recipe.name, source, ranks, target_device, dtype),
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
    base = load_base_model(base_path)
    return assemble_restorer(
        base, weights, prompt=prompt, tokenizer_source=base_path, precision=precision, device=device
    )
