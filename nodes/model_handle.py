"""``FIDESR_MODEL``: the engine's ``OneStepRestorer`` and one ComfyUI model patcher per network.

ComfyUI's memory manager places each network like its own models, with the patcher class it uses for them.
A U-Net Load FiDeSR Model built gets ComfyUI's castable layers (``comfy.ops.disable_weight_init``), so it can
be loaded partly (``--lowvram``, a small GPU); the VAE (whose tiles read its weights directly) and the small
LRRB are loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.ops
import torch

from ..fidesr_core.networks.families import FamilyRecipe
from ..fidesr_core.networks.model import OneStepRestorer
from .errors import node_error

FIDESR_MODEL = "FIDESR_MODEL"  # the custom ComfyUI socket type

# torch layer class -> the name of ComfyUI's castable class that replaces it
_CASTABLE_LAYERS = {
    torch.nn.Linear: "Linear",
    torch.nn.Conv2d: "Conv2d",
    torch.nn.GroupNorm: "GroupNorm",
    torch.nn.LayerNorm: "LayerNorm",
}


class FiDeSRNetwork(torch.nn.Module):
    """One network as the memory manager holds it: ``ModelPatcher`` records the device on the module it
    manages, which diffusers modules do not allow, so the network sits one level down."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network


class FiDeSRUNet(FiDeSRNetwork):
    """The LoRA-merged U-Net (named in ComfyUI's log when it is loaded)."""


class FiDeSRVAE(FiDeSRNetwork):
    """The SD 2.1 VAE."""


class FiDeSRLRRB(FiDeSRNetwork):
    """The Latent Residual Refinement Block."""


def make_castable(network: torch.nn.Module) -> bool:
    """Give the layers ComfyUI's castable classes; True when every weight is in such a layer."""
    ops = comfy.ops.disable_weight_init
    for module in network.modules():
        name = _CASTABLE_LAYERS.get(type(module))
        if name is not None:
            module.__class__ = getattr(ops, name)
    castable = {id(p) for m in network.modules() if hasattr(m, "comfy_cast_weights") for p in m.parameters(False)}
    return all(id(parameter) in castable for parameter in network.parameters())


@dataclass(eq=False)
class FiDeSRModelHandle:
    model: OneStepRestorer
    patchers: dict[str, comfy.model_patcher.ModelPatcher]  # "unet", "vae", and "lrrb" when the model has one
    partial_load: dict[str, bool]  # whether the memory manager may load a network only partly
    base_name: str
    weights_name: str

    @classmethod
    def wrap(
        cls,
        model: OneStepRestorer,
        *,
        base_name: str,
        weights_name: str,
        unet_patcher: comfy.model_patcher.ModelPatcher | None = None,
    ) -> FiDeSRModelHandle:
        """Patchers on ComfyUI's devices for ``model``'s networks (which rest on the offload device);
        ``unet_patcher``: ComfyUI's own MODEL runs the U-Net (else the pack's U-Net gets one)."""
        unet_devices = model_management.get_torch_device(), model_management.unet_offload_device()
        networks = {"vae": (FiDeSRVAE(model.vae), model_management.vae_device(), model_management.vae_offload_device())}
        if unet_patcher is None:
            networks["unet"] = (FiDeSRUNet(model.unet), *unet_devices)
        if model.lrrb is not None:
            networks["lrrb"] = (FiDeSRLRRB(model.lrrb), *unet_devices)
        # read when used: ComfyUI 0.33+ sets CoreModelPatcher at start-up (dynamic VRAM); older ones lack it
        patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        patchers = {
            name: patcher_class(network, load_device=load, offload_device=offload)
            for name, (network, load, offload) in networks.items()
        }
        partial = dict.fromkeys(patchers, False)
        if unet_patcher is None:
            partial["unet"] = make_castable(model.unet)
        else:
            patchers["unet"], partial["unet"] = unet_patcher, True
        return cls(model=model, patchers=patchers, partial_load=partial, base_name=base_name, weights_name=weights_name)

    @property
    def recipe(self) -> FamilyRecipe:
        return self.model.recipe

    @property
    def family_name(self) -> str:
        """The family's name: FiDeSR, PiSA-SR or OSEDiff."""
        return self.model.recipe.name

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cross_attention_dim(self) -> int:
        return int(self.model.prompt_embedding.shape[-1])

    def __str__(self) -> str:
        device = self.patchers["unet"].load_device
        return f"{self.family_name}({self.base_name} + {self.weights_name}, {self.dtype}, runs on {device})"


def require_handle(value: object, node: str) -> FiDeSRModelHandle:
    """``value`` as a handle, or an error saying to connect Load FiDeSR Model."""
    if not isinstance(value, FiDeSRModelHandle):
        raise node_error(
            node, f"model must come from Load FiDeSR Model or FiDeSR Model from Checkpoint, got {type(value).__name__}"
        )
    return value
