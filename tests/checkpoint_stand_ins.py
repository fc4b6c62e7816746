"""Test helper: stand-ins of ComfyUI's MODEL, CLIP, VAE and LoRA loader over a tiny diffusers base model.

The MODEL applies patches with ComfyUI's formulas (``set`` copies, a LoRA adds ``alpha / rank ·
up @ down``) to its own copy of the tiny U-Net; ``model_lora_keys_unet`` maps kohya names as ComfyUI
does.  Used by ``test_nodes_checkpoint_model.py`` and the workflow tests.
"""

from __future__ import annotations

import copy
import shutil
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from ldm_export import vae_to_ldm, write_config_folder

CONV_IN = "diffusion_model.input_blocks.0.0."  # ComfyUI names conv_in as the original U-Net does


class SD20:  # ComfyUI's config class of SD 2.x, by name
    def __init__(self, context_dim: int) -> None:
        self.unet_config = {"context_dim": context_dim}


class StandInBase(torch.nn.Module):
    """ComfyUI's BaseModel: the patched U-Net behind ``diffusion_model(x, t, context=..., transformer_options=...)``."""

    def __init__(self, unet: torch.nn.Module, prediction: str = "EPS", config: type = SD20) -> None:
        super().__init__()
        self.unet, self.model_config = unet, config(unet.config.cross_attention_dim)
        self.model_type, self.manual_cast_dtype = types.SimpleNamespace(name=prediction), None
        self.calls: list[tuple[torch.Tensor, torch.dtype]] = []

    def get_dtype(self) -> torch.dtype:
        return torch.float32

    def diffusion_model(self, x, timesteps, context=None, transformer_options=None):
        self.calls.append((timesteps, context.dtype))
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


class StandInModel:
    """ComfyUI's MODEL (a ModelPatcher): clones hold their own patched copy here, ComfyUI shares one and re-patches."""

    def __init__(self, base: StandInBase) -> None:
        self.model, self.patches, self.model_options = base, {}, {}
        self.load_device = self.offload_device = torch.device("cpu")

    def clone(self) -> StandInModel:
        return StandInModel(StandInBase(copy.deepcopy(self.model.unet)))

    def add_patches(self, patches: dict, strength_patch: float = 1.0) -> list[str]:
        weights = {"diffusion_model." + k: v for k, v in self.model.unet.state_dict(keep_vars=True).items()}
        applied = []
        for key, (kind, values) in patches.items():
            key = key.replace(CONV_IN, "diffusion_model.conv_in.")
            weight = weights[key].data
            if kind == "set":
                weight.copy_(values[0])
            else:  # ComfyUI's LoRA: up, down, alpha
                up, down, alpha = values
                delta = up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0]) * strength_patch
                weight += delta.reshape(weight.shape)
            self.patches.setdefault(key, []).append(kind)
            applied.append(key)
        return applied


def lora_module() -> types.ModuleType:
    """``comfy.lora``: kohya names of the U-Net's layers, and LoRA tensors to (kind, (up, down, alpha)) patches."""

    def model_lora_keys_unet(model, key_map):
        for name, _ in model.unet.named_parameters():
            if name.endswith(".weight"):
                key_map["lora_unet_" + name.removesuffix(".weight").replace(".", "_")] = "diffusion_model." + name
        return key_map

    def load_lora(tensors, key_map, log_missing=True):
        stems = {key.rsplit(".", 2)[0] if "lora_" in key else key.rsplit(".", 1)[0] for key in tensors}
        return {
            key_map[stem]: ("lora", (tensors[f"{stem}.lora_up.weight"], tensors[f"{stem}.lora_down.weight"],
                                     float(tensors[f"{stem}.alpha"])))
            for stem in stems
        }  # fmt: skip

    return types.SimpleNamespace(model_lora_keys_unet=model_lora_keys_unet, load_lora=load_lora)


def clip_and_vae(base: Any, text_embedding: Any) -> tuple[Any, Any]:
    """Load Checkpoint's CLIP (``text_embedding(text)`` encodes) and VAE (the base's VAE in the original layout)."""
    clip = types.SimpleNamespace(tokenize=lambda text: text, encode_from_tokens=text_embedding)
    state = {key.removeprefix("first_stage_model."): value for key, value in vae_to_ldm(base.vae).items()}
    vae = types.SimpleNamespace(first_stage_model=types.SimpleNamespace(state_dict=lambda: state))
    return clip, vae


@contextmanager
def comfy_lora_and_config(restorer_module: Any, base: Any, folder: Path) -> Iterator[None]:
    """``comfy.lora`` stood in, and the tiny VAE's config (not SD 2.1's) where the engine reads the VAE's."""
    config_dir = write_config_folder(base, folder)
    if not (config_dir / "scheduler").exists():
        shutil.copytree(restorer_module.SD21_BASE_CONFIG_DIR / "scheduler", config_dir / "scheduler")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "comfy.lora", lora_module())
        patch.setattr(restorer_module, "SD21_BASE_CONFIG_DIR", config_dir)
        yield


def stand_in_model(base: Any) -> StandInModel:
    return StandInModel(StandInBase(copy.deepcopy(base.unet)))
