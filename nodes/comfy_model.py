"""FiDeSR Model from Checkpoint: a family's weights on ComfyUI's own SD 2.1 MODEL, CLIP and VAE (Load Checkpoint):
its LoRA as ComfyUI patches on clones of the MODEL, a diffusers copy of the VAE for the tiled VAE (README).
"""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_management as model_management
import torch
from comfy_api.v0_0_2 import io, ui

from ..fidesr_core.networks.families import LoraSet, RestorerWeights, recipe_for
from ..fidesr_core.networks.lora import PEFT_KEY
from ..fidesr_core.precision import dtype_name
from .errors import engine_errors, node_error
from .inputs import FiDeSRModelType, schema
from .loader import weights_choice_problem
from .model_folders import WEIGHTS_SOURCES, fidesr_weight_choices, resolve_fidesr_weights
from .model_handle import FiDeSRModelHandle

CHECKPOINT_NODE = "FiDeSR Model from Checkpoint"
_CONV_IN = "diffusion_model.input_blocks.0.0."  # SD's conv_in in ComfyUI's (original) U-Net layout
logger = logging.getLogger("FiDeSR")


def lora_in_kohya_form(lora_set: LoraSet) -> dict[str, torch.Tensor]:
    """A peft-named LoRA set as the ``lora_unet_<module>.lora_down/lora_up/alpha`` tensors ComfyUI's LoRA loader
    reads; ``alpha / rank`` stays the scale."""
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in lora_set.state.items():
        match = PEFT_KEY.match(key)
        if match is None:
            continue
        stem = "lora_unet_" + match["module"].replace(".", "_")
        tensors[f"{stem}.lora_{'down' if match['part'] == 'A' else 'up'}.weight"] = tensor.float()
        tensors[f"{stem}.alpha"] = torch.tensor(float(lora_set.alpha))
    return tensors


class ComfyUNet(torch.nn.Module):
    """The U-Net step on a patched clone of ComfyUI's MODEL, called as diffusers' U-Net (``OneStepRestorer.unet``);
    ``enable_adapters`` / ``disable_adapters`` (peft's names) switch to PiSA-SR's pixel-only clone and back."""

    def __init__(self, patcher: Any, pixel_patcher: Any | None = None) -> None:
        super().__init__()
        self.patchers = {"full": patcher, "pixel": pixel_patcher}  # a dict: not submodules, so never moved by .to()
        self.active = "full"

    def _switch(self, name: str) -> None:
        self.active = name
        model_management.load_models_gpu([self.patchers[name]])

    def enable_adapters(self) -> None:
        self._switch("pixel")

    def disable_adapters(self) -> None:
        self._switch("full")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype ComfyUI computes the MODEL in (its weights may be stored in another, e.g. fp8)."""
        base = self.patchers["full"].model
        if hasattr(base, "get_dtype_inference"):
            return base.get_dtype_inference()
        return base.manual_cast_dtype or base.get_dtype()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, **_):
        """``[B, 4, h, w]`` -> ``(output [B, 4, h, w],)`` of ComfyUI's diffusion model at the family's timestep."""
        patcher = self.patchers[self.active]
        base, dtype = patcher.model, self.dtype
        options = dict(patcher.model_options.get("transformer_options", {}))
        if hasattr(patcher, "is_dynamic"):  # as ComfyUI's own apply_model does (0.33+)
            options["prefetch_dynamic_vbars"] = patcher.is_dynamic()
        timesteps = timestep.to(sample.device).float().expand(sample.shape[0])
        context = encoder_hidden_states.to(device=sample.device, dtype=dtype)
        output = base.diffusion_model(sample.to(dtype), timesteps, context=context, transformer_options=options)
        return (output,)


def check_sd21_base(model: Any) -> None:
    """Raise a node error unless ``model`` is ComfyUI's MODEL of an SD 2.x U-Net predicting noise (SD 2.1-base)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    if config is None or not hasattr(model, "clone"):
        raise node_error(
            CHECKPOINT_NODE, f"sd_model must be a MODEL (e.g. from Load Checkpoint), got {type(model).__name__}"
        )
    prediction = getattr(getattr(model.model, "model_type", None), "name", "?")
    if type(config).__name__ != "SD20" or prediction != "EPS":
        raise node_error(
            CHECKPOINT_NODE,
            "sd_model must be Stable Diffusion 2.1-base (512 px, epsilon prediction, e.g. Load Checkpoint with "
            f"v2-1_512-ema-pruned.safetensors), got a {type(config).__name__} model predicting {prediction}",
        )


def patched_clone(model: Any, weights: RestorerWeights, parts: tuple[str, ...]) -> Any:
    """A clone of ComfyUI's ``model`` with the family's U-Net LoRA ``parts`` (and OSEDiff's conv_in) as patches."""
    import comfy.lora as comfy_lora  # here: the tests' stand-in for ComfyUI lacks it (they give their own)

    clone = model.clone()
    if weights.conv_in_state:  # replaces the base's conv_in, before the LoRA that conv_in carries too
        sets = {_CONV_IN + name: ("set", (tensor.float(),)) for name, tensor in weights.conv_in_state.items()}
        clone.add_patches(sets, 1.0)
    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    for part in parts:
        modules = sorted({m for names in weights.lora[part].target_modules.values() for m in names})
        patches = comfy_lora.load_lora(lora_in_kohya_form(weights.lora[part]), key_map, log_missing=False)
        applied = clone.add_patches(patches, 1.0)
        if len(applied) != len(modules):
            raise node_error(
                CHECKPOINT_NODE,
                f"{len(modules) - len(applied)} of the {len(modules)} layers of the {part} LoRA are not in this MODEL; "
                "it needs Stable Diffusion 2.1-base",
            )
    return clone


def prompt_embedding(clip: Any, text: str, width: int) -> torch.Tensor:
    """``[1, 77, width]`` float32: ComfyUI's CLIP encoding of ``text`` (SD 2: the penultimate layer, normed)."""
    if not hasattr(clip, "encode_from_tokens"):
        raise node_error(CHECKPOINT_NODE, f"clip must be a CLIP (e.g. from Load Checkpoint), got {type(clip).__name__}")
    embedding = clip.encode_from_tokens(clip.tokenize(text))
    if embedding.ndim != 3 or embedding.shape[-1] != width:
        raise node_error(
            CHECKPOINT_NODE,
            f"clip gives a {list(embedding.shape)} embedding; the MODEL takes [1, 77, {width}]: use the CLIP of the "
            "same checkpoint",
        )
    return embedding.detach().float().cpu()


class FiDeSRModelFromCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "FiDeSRModelFromCheckpoint",
            CHECKPOINT_NODE,
            "A restorer on ComfyUI's own Stable Diffusion 2.1-base: connect Load Checkpoint's MODEL, CLIP and VAE "
            "(v2-1_512-ema-pruned.safetensors; or UNETLoader/CLIPLoader/VAELoader, or fp8/GGUF loaders of the same "
            "model) and pick FiDeSR, PiSA-SR or OSEDiff weights from models/fidesr. The family's LoRA is applied as "
            "ComfyUI patches on a copy of the MODEL (yours is unchanged), so the checkpoint is read once and ComfyUI "
            "manages the U-Net as its own. Gives the same images as Load FiDeSR Model with the same files.",
            [
                io.Model.Input(
                    "sd_model", tooltip="SD 2.1-base's MODEL (512 px, epsilon), e.g. from Load Checkpoint's MODEL."
                ),
                io.Clip.Input("clip", tooltip="The same checkpoint's CLIP: it encodes the family's released prompt."),
                io.Vae.Input("vae", tooltip="The same checkpoint's VAE (the SD 2.x VAE)."),
                io.Combo.Input(
                    "fidesr_weights",
                    options=fidesr_weight_choices(),
                    tooltip="Weights from models/fidesr: FiDeSR's fidesr.pkl, PiSA-SR's pisa_sr.pkl, OSEDiff's "
                    "osediff.pkl, or a .safetensors copy of any (the family is told from the file).",
                ),
            ],
            [
                FiDeSRModelType.Output(
                    display_name="model", tooltip="The restorer: connect it to the other FiDeSR nodes."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, fidesr_weights: str) -> bool | str:
        return weights_choice_problem(fidesr_weights) or True

    @classmethod
    def execute(cls, sd_model: Any, clip: Any, vae: Any, fidesr_weights: str) -> io.NodeOutput:
        node, model = CHECKPOINT_NODE, sd_model
        check_sd21_base(model)
        if not hasattr(vae, "first_stage_model"):
            raise node_error(node, f"vae must be a VAE (e.g. from Load Checkpoint), got {type(vae).__name__}")
        weights_path = resolve_fidesr_weights(fidesr_weights, node)
        from ..fidesr_core.loading.restorer import restorer_on_unet  # diffusers: imported when a model is made
        from ..fidesr_core.loading.weights import load_restorer_weights

        with engine_errors(node, sources=WEIGHTS_SOURCES):
            weights = load_restorer_weights(weights_path)
            weights.metadata.setdefault("path", weights_path)
        unet_parts = tuple(part for part in weights.lora if part != "vae_encoder")
        full = patched_clone(model, weights, unet_parts)
        pixel = patched_clone(model, weights, ("pixel",)) if weights.family == "pisa-sr" else None
        width = model.model.model_config.unet_config["context_dim"]
        embedding = prompt_embedding(clip, recipe_for(weights.family).prompt_text(), width)
        unet = ComfyUNet(full, pixel)
        with engine_errors(node):
            restorer = restorer_on_unet(
                weights,
                unet,
                vae.first_stage_model.state_dict(),
                embedding,
                dtype=unet.dtype,
                device=model_management.unet_offload_device(),
                base_source="ComfyUI's MODEL and VAE",
                base_kind="ComfyUI checkpoint",
            )
        restorer.pixel_only_adapters = ("pixel",) if pixel is not None else ()
        handle = FiDeSRModelHandle.wrap(
            restorer, base_name="checkpoint MODEL", weights_name=fidesr_weights, unet_patcher=full
        )
        summary = f"{handle.family_name}: {fidesr_weights} on the checkpoint's MODEL, {dtype_name(restorer.dtype)}"
        logger.info("FiDeSR pack made %s", summary)
        return io.NodeOutput(handle, ui=ui.PreviewText(summary))
