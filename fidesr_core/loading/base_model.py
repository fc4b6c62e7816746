"""Loading Stable Diffusion 2.1-base offline: a diffusers folder or one original (LDM) checkpoint file.

Nothing here talks to the Hugging Face Hub.  Networks are built on the meta
device from local JSON configs and their weights are assigned in place
(``load_state_dict(assign=True)``), so loading needs about the model's size in
RAM and no random initialisation.  Single files are converted one component
at a time with diffusers' LDM key conversion (U-Net, VAE) and our own
OpenCLIP mapping (text encoder), using the bundled SD 2.1-base configs unless
``config_dir`` names another folder of the same layout.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import BaseModelError, ModelFileError
from ..networks.model import BaseModel
from .checkpoint_files import OpenedCheckpoint, open_checkpoint
from .identify import (
    UNET_PREFIX,
    VAE_PREFIX,
    ModelIdentity,
    diffusers_component_files,
    identify_checkpoint,
    identify_model_file,
    read_json_object,
)
from .open_clip_convert import clip_text_state_for, needed_open_clip_keys, open_clip_to_clip_text

__all__ = ["SD21_BASE_CONFIG_DIR", "SD21_BASE_HINT", "load_base_model", "empty_components"]

logger = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=torch.nn.Module)

SD21_BASE_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd21_base"
SD21_BASE_HINT = (
    "FiDeSR needs Stable Diffusion 2.1-base (e.g. v2-1_512-ema-pruned.safetensors or a diffusers folder of "
    "stabilityai/stable-diffusion-2-1-base)"
)
_LEGACY_ATTENTION = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _refusal(path: Path, identity: ModelIdentity) -> str:
    return f"{path} looks like {identity.description}; {SD21_BASE_HINT}"


# --------------------------------------------------------------------------- empty networks


def _empty_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _empty_vae(config: dict) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL.from_config(config)


def _empty_text_encoder(config: CLIPTextConfig) -> CLIPTextModel:
    with torch.device("meta"):
        return CLIPTextModel(config)


def _text_config(path: Path) -> CLIPTextConfig:
    try:
        return CLIPTextConfig.from_json_file(str(path))
    except (OSError, ValueError, TypeError) as error:
        raise BaseModelError(f"{path} is not a usable CLIP text-encoder config ({error})") from error


def empty_components(
    config_dir: str | os.PathLike | None = None,
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """U-Net, VAE and text encoder of ``config_dir`` (default: SD 2.1-base) on the meta device, no weights."""
    folder = Path(config_dir) if config_dir is not None else SD21_BASE_CONFIG_DIR
    for component in ("unet", "vae", "text_encoder"):
        if not (folder / component / "config.json").is_file():
            raise BaseModelError(f"config folder {folder} has no {component}/config.json")
    return (
        _empty_unet(read_json_object(folder / "unet" / "config.json")),
        _empty_vae(read_json_object(folder / "vae" / "config.json")),
        _empty_text_encoder(_text_config(folder / "text_encoder" / "config.json")),
    )


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str, source: Path) -> None:
    """Put ``state`` (float32 tensors) into the meta-device ``model``; every key and shape must match."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BaseModelError(
            f"{source}: the {what} weights do not match its config: {len(missing)} missing "
            f"({_examples(missing)}), {len(unexpected)} unexpected ({_examples(unexpected)}); {SD21_BASE_HINT}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BaseModelError(
                f"{source}: {what} weight {key} has shape {tuple(tensor.shape)}, the config expects "
                f"{tuple(expected[key].shape)} (another model size); {SD21_BASE_HINT}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(model.named_buffers()):
        if buffer.device.type != "meta":
            continue
        owner_name, _, buffer_name = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if buffer_name != "position_ids":
            raise BaseModelError(f"{source}: {what} buffer {name} has no value after loading")
        # transformers keeps CLIP's position ids as a non-persistent [1, max_positions] buffer.
        owner.register_buffer(buffer_name, torch.arange(buffer.shape[-1]).expand(1, -1), persistent=False)


def _finish(model: ModelT) -> ModelT:
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- single files


def _convert(convert, state: dict[str, torch.Tensor], config: dict, *, what: str, source: Path):
    try:
        return convert(state, config)
    except (KeyError, IndexError, ValueError, RuntimeError) as error:
        raise BaseModelError(
            f"{source}: the {what} weights cannot be converted from the original layout "
            f"({type(error).__name__}: {error}); the file is incomplete or not SD 2.x. {SD21_BASE_HINT}"
        ) from error


def _component_from_checkpoint(checkpoint: OpenedCheckpoint, model: ModelT, *, prefix: str, what: str) -> ModelT:
    """Convert the ``prefix.*`` weights of an original-layout checkpoint into ``model`` (the U-Net or the VAE)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    converter = convert_ldm_unet_checkpoint if prefix == UNET_PREFIX else convert_ldm_vae_checkpoint
    original = checkpoint.load([key for key in checkpoint.shapes if key.startswith(prefix)], torch.float32)
    state = _convert(converter, original, dict(model.config), what=what, source=checkpoint.path)
    del original
    _assign_weights(model, state, what=what, source=checkpoint.path)
    return _finish(model)


def _text_encoder_from_checkpoint(checkpoint: OpenedCheckpoint, text_encoder: CLIPTextModel) -> CLIPTextModel:
    layers = text_encoder.config.num_hidden_layers
    original = checkpoint.load(needed_open_clip_keys(checkpoint.shapes, layers), torch.float32)
    try:
        converted = open_clip_to_clip_text(original, layers)
    except (KeyError, ValueError) as error:
        raise BaseModelError(
            f"{checkpoint.path}: the OpenCLIP text encoder cannot be converted ({error}); {SD21_BASE_HINT}"
        ) from error
    del original
    state = clip_text_state_for(text_encoder.state_dict(), converted)
    _assign_weights(text_encoder, state, what="text encoder", source=checkpoint.path)
    return _finish(text_encoder)


def _load_single_file(path: Path, config_dir: Path) -> BaseModel:
    checkpoint = open_checkpoint(path)  # a zip pickle is memory-mapped: cheap to identify
    identity = identify_checkpoint(checkpoint)
    if not identity.is_sd2:
        raise BaseModelError(_refusal(path, identity))
    if checkpoint.mapped:  # read it into memory once; its tensors then become the weights without copies
        checkpoint = open_checkpoint(path, mmap=False)
    for note in identity.notes:
        logger.warning("%s: %s", path, note)
    unet, vae, text_encoder = empty_components(config_dir)
    unet = _component_from_checkpoint(checkpoint, unet, prefix=UNET_PREFIX, what="U-Net")
    vae = _component_from_checkpoint(checkpoint, vae, prefix=VAE_PREFIX, what="VAE")
    text_encoder = _text_encoder_from_checkpoint(checkpoint, text_encoder)
    checkpoint.release()
    return BaseModel(
        unet=unet, vae=vae, text_encoder=text_encoder, source=str(path), kind=f"single file ({path.suffix.lower()})"
    )


# --------------------------------------------------------------------------- diffusers folders


def _read_component(folder: Path, component: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in diffusers_component_files(folder, component):
        checkpoint = open_checkpoint(file, mmap=False)
        state.update(checkpoint.load(checkpoint.shapes, torch.float32))
        checkpoint.release()
    return state


def _rename_legacy_attention(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE files name the mid-block attention query/key/value/proj_attn."""
    renamed = {}
    for key, tensor in state.items():
        match = _LEGACY_ATTENTION.fullmatch(key)
        if key not in expected and match:
            new_key = f"{match.group(1)}.{_LEGACY_NAMES[match.group(2)]}.{match.group(3)}"
            if new_key in expected:
                key = new_key
                tensor = tensor.reshape(tensor.shape[:2]) if tensor.ndim == 4 else tensor  # 1x1 conv -> linear
        renamed[key] = tensor
    return renamed


def _load_folder(folder: Path) -> BaseModel:
    identity = identify_model_file(folder)
    if not identity.is_sd2:
        raise BaseModelError(_refusal(folder, identity))
    for note in identity.notes:
        logger.warning("%s: %s", folder, note)

    unet = _empty_unet(read_json_object(folder / "unet" / "config.json"))
    state = _rename_legacy_attention(_read_component(folder, "unet"), set(unet.state_dict()))
    _assign_weights(unet, state, what="U-Net", source=folder / "unet")

    vae = _empty_vae(read_json_object(folder / "vae" / "config.json"))
    state = _rename_legacy_attention(_read_component(folder, "vae"), set(vae.state_dict()))
    _assign_weights(vae, state, what="VAE", source=folder / "vae")

    text_encoder = _empty_text_encoder(_text_config(folder / "text_encoder" / "config.json"))
    stored = _read_component(folder, "text_encoder")
    # Files name the keys with or without "text_model." (transformers 4 / 5); old ones also store position_ids.
    plain = {
        key.removeprefix("text_model."): value for key, value in stored.items() if not key.endswith("position_ids")
    }
    _assign_weights(
        text_encoder,
        clip_text_state_for(text_encoder.state_dict(), plain),
        what="text encoder",
        source=folder / "text_encoder",
    )
    del state, stored, plain
    return BaseModel(
        unet=_finish(unet),
        vae=_finish(vae),
        text_encoder=_finish(text_encoder),
        source=str(folder),
        kind="diffusers folder",
    )


# --------------------------------------------------------------------------- entry point


def load_base_model(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None) -> BaseModel:
    """Load SD 2.1-base from a diffusers folder or a single checkpoint file (float32, CPU, eval, frozen).

    ``config_dir`` replaces the bundled SD 2.1-base configs used to convert a
    single file (a folder with unet/, vae/ and text_encoder/ config.json).
    Anything else than an SD 2.x text-to-image model raises ``BaseModelError``
    saying what the input looks like instead.
    """
    path = Path(path).expanduser()
    if path.name == "model_index.json" and path.is_file():
        path = path.parent
    if not path.exists():
        raise BaseModelError(f"{path}: no such file or folder; {SD21_BASE_HINT}")
    try:
        if path.is_dir():
            return _load_folder(path)
        return _load_single_file(path, Path(config_dir) if config_dir is not None else SD21_BASE_CONFIG_DIR)
    except BaseModelError:
        raise
    except ModelFileError as error:
        raise BaseModelError(f"{error}; {SD21_BASE_HINT}") from error
