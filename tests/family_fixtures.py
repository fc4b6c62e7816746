"""Test helper: PiSA-SR and OSEDiff checkpoint dicts on the tiny SD 2-shaped networks, built as their trainers save them.

The released trainers put peft adapters on the U-Net (and, for OSEDiff, the VAE) by a rule on
parameter names, train, and ``torch.save`` the module lists, the ranks and every state entry
whose name contains ``lora`` (OSEDiff also ``conv_in``, which it trains fully). The rules are
written out here from the released code's facts (docs/algorithm.md §5, §9), not taken from the
engine; tensors are random and non-zero so that every one of them counts.
"""

from __future__ import annotations

import copy
import warnings

import torch
from peft import LoraConfig

from fidesr_core.networks.model import BaseModel

__all__ = ["UNET_PATTERNS", "released_unet_targets", "released_vae_targets", "pisa_sr_checkpoint", "osediff_checkpoint"]

UNET_PATTERNS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
    "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip
VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


def released_unet_targets(unet: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(encoder, decoder, others) module lists by the released trainers' rule (first matching pattern wins)."""
    encoder, decoder, others = [], [], []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in UNET_PATTERNS:
            if pattern not in name:
                continue
            module = name.replace(".weight", "")
            if "down_blocks" in name or "conv_in" in name:
                encoder.append(module)
            elif "up_blocks" in name or "conv_out" in name:
                decoder.append(module)
            else:
                others.append(module)
            break
    return encoder, decoder, others


def released_vae_targets(vae: torch.nn.Module) -> list[str]:
    """OSEDiff's VAE list: no ``break`` in its loop, so a module is listed once per pattern it matches."""
    modules = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_PATTERNS:
            if pattern in name and "encoder" in name:
                modules.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                modules.append(name.replace(".weight", ""))
    return modules


def _add(network: torch.nn.Module, rank: int, modules: list[str], adapter: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns when a second adapter joins the first
        network.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules), adapter)


def _randomise(network: torch.nn.Module, fragment: str, generator: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if fragment in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def pisa_sr_checkpoint(base: BaseModel, *, rank_pix: int = 4, rank_sem: int = 2, seed: int = 1) -> dict:
    """What PiSA-SR's ``save_model`` writes, on a copy of ``base``'s U-Net (ranks differ so mix-ups show)."""
    unet = copy.deepcopy(base.unet)
    lists = dict(zip(("encoder", "decoder", "others"), released_unet_targets(unet), strict=True))
    checkpoint: dict = {}
    for kind, rank in (("pix", rank_pix), ("sem", rank_sem)):
        for part, modules in lists.items():
            _add(unet, rank, modules, f"default_{part}_{kind}")
            checkpoint[f"unet_lora_{part}_modules_{kind}"] = modules
    _randomise(unet, "lora", torch.Generator().manual_seed(seed))
    checkpoint["lora_rank_unet_pix"] = rank_pix
    checkpoint["lora_rank_unet_sem"] = rank_sem
    checkpoint["state_dict_unet"] = {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k}
    return checkpoint


def osediff_checkpoint(base: BaseModel, *, rank_unet: int = 4, rank_vae: int = 2, seed: int = 1) -> dict:
    """What OSEDiff's ``save_model`` writes, on copies of ``base``'s U-Net and VAE (conv_in retrained)."""
    generator = torch.Generator().manual_seed(seed)
    unet, vae = copy.deepcopy(base.unet), copy.deepcopy(base.vae)
    encoder, decoder, others = released_unet_targets(unet)
    adapters = ("default_encoder", "default_decoder", "default_others")
    for adapter, modules in zip(adapters, (encoder, decoder, others), strict=True):
        _add(unet, rank_unet, modules, adapter)
    vae_modules = released_vae_targets(vae)
    _add(vae, rank_vae, vae_modules, "default_encoder")
    _randomise(unet, "lora", generator)
    _randomise(vae, "lora", generator)
    with torch.no_grad():  # "trained fully": a conv_in clearly different from the base model's
        for parameter in (unet.conv_in.base_layer.weight, unet.conv_in.base_layer.bias):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return {
        "vae_lora_encoder_modules": vae_modules,
        "unet_lora_encoder_modules": encoder,
        "unet_lora_decoder_modules": decoder,
        "unet_lora_others_modules": others,
        "rank_unet": rank_unet,
        "rank_vae": rank_vae,
        "state_dict_unet": {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v.clone() for k, v in vae.state_dict().items() if "lora" in k},
    }
