"""Loading Stable Diffusion 2.1-base offline: a diffusers folder or one original (LDM) checkpoint file.

Nothing here talks to the Hugging Face Hub.  Every input is identified first
(``identify``) and refused before any weight is read unless it is an SD 2.x
text-to-image model.  Diffusers folders are read by the libraries'
``from_pretrained(local_files_only=True)`` (shards, fp16 variants, old attention
names and transformers 4/5 key names are theirs to handle).  Single files are
converted one component at a time with diffusers' own single-file conversions
into networks built on the meta device from local JSON configs (the bundled
SD 2.1-base ones unless ``config_dir`` names another folder of the same layout).
Either way the weights end up float32, in memory of their own: never views
of a mapped file, which rewriting the file would turn into a crash.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import BaseModelError, ModelFileError
from ..networks.model import BaseModel
from ..networks.text_embedding import EOS_TOKEN_ID
from .checkpoint_files import OpenedCheckpoint, open_checkpoint
from .file_rules import OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, ModelIdentity
from .identify import identify_checkpoint, identify_model_file, read_json_object

__all__ = ["SD21_BASE_CONFIG_DIR", "SD21_BASE_HINT", "load_base_model", "check_base_model", "empty_components"]

logger = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=torch.nn.Module)

SD21_BASE_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd21_base"
SD21_BASE_HINT = (
    "FiDeSR needs Stable Diffusion 2.1-base (e.g. v2-1_512-ema-pruned.safetensors or a diffusers folder of "
    "stabilityai/stable-diffusion-2-1-base)"
)
SD2_VOCABULARY = EOS_TOKEN_ID + 1  # SD 2's tokenizer hands out ids up to its end-of-text token
_RESBLOCK = re.compile(re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
# Weight files of a diffusers component without a variant: model.safetensors, pytorch_model-00001-of-00002.bin, ...
_PLAIN_WEIGHTS = re.compile(r"[A-Za-z_]+(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
_VARIANT_WEIGHTS = re.compile(
    r"[A-Za-z_]+\.(?P<variant>\w+?)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?"
    r"|[A-Za-z_]+\.(safetensors|bin)\.index\.(?P<index_variant>\w+)\.json"  # the newer index naming
)


def _refusal(path: Path, identity: ModelIdentity) -> str:
    return f"{path} looks like {identity.description}; {SD21_BASE_HINT}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------- networks and their memory


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
    with torch.device("meta"):
        return (
            UNet2DConditionModel.from_config(read_json_object(folder / "unet" / "config.json")),
            AutoencoderKL.from_config(read_json_object(folder / "vae" / "config.json")),
            CLIPTextModel(_text_config(folder / "text_encoder" / "config.json")),
        )


@torch.no_grad()
def _into_own_float32_memory(model: ModelT) -> ModelT:
    """Replace every parameter and buffer by a float32 (when floating) copy in memory of its own.

    ``from_pretrained`` leaves safetensors weights as views of the memory-mapped file (diffusers: unaligned,
    of one storage for the whole file; transformers: one storage per tensor), which cannot be told apart
    from owned memory cheaply: everything is copied, one tensor at a time.
    """
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                copy = tensor.detach().to(torch.float32 if tensor.is_floating_point() else tensor.dtype, copy=True)
                store[name] = torch.nn.Parameter(copy, requires_grad=False) if store is module._parameters else copy
    return model


def _finish(model: ModelT) -> ModelT:
    return model.eval().requires_grad_(False)


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


def _check_vocabulary(text_encoder: CLIPTextModel, source: Path) -> None:
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if rows < SD2_VOCABULARY:
        raise BaseModelError(
            f"{source}: the text encoder has {rows} token embeddings; SD 2's tokenizer needs {SD2_VOCABULARY} "
            f"(token ids up to {EOS_TOKEN_ID}): a foreign or damaged text encoder. {SD21_BASE_HINT}"
        )


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
    """The OpenCLIP text tower (``cond_stage_model.model.*``) by diffusers' ``convert_open_clip_checkpoint``.

    SD 2 reads the penultimate block, so the config has one layer fewer than the file: blocks past
    ``num_hidden_layers`` are not even read.  ``text_projection`` goes with every block for its shape
    (the converter splits q, k and v by it).
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    layers = text_encoder.config.num_hidden_layers
    groups: dict[int, list[str]] = {}  # block index -> its keys; -1: the keys outside the blocks
    for key in checkpoint.shapes:
        block = _RESBLOCK.match(key)
        index = -1 if block is None else int(block.group(1))
        if key.startswith(OPEN_CLIP_PREFIX) and index < layers:
            groups.setdefault(index, []).append(key)
    projection_key = OPEN_CLIP_PREFIX + "text_projection"
    projection = checkpoint.load([projection_key], torch.float32) if projection_key in checkpoint.shapes else {}
    converted: dict[str, torch.Tensor] = {}
    # One block at a time: the converter copies q, k and v out of a block's packed in_proj while it holds it.
    for index in sorted(groups):
        original = checkpoint.load([key for key in groups[index] if key != projection_key], torch.float32)
        try:
            converted |= convert_open_clip_checkpoint(text_encoder, original | projection, prefix=OPEN_CLIP_PREFIX)
        except (KeyError, IndexError, ValueError, RuntimeError) as error:
            raise BaseModelError(
                f"{checkpoint.path}: the OpenCLIP text encoder cannot be converted ({type(error).__name__}: {error}); "
                f"{SD21_BASE_HINT}"
            ) from error
        del original
    # diffusers names the keys for transformers 4 ("text_model." prefix); transformers 5 models have none.
    wants_prefix = any(key.startswith("text_model.") for key in text_encoder.state_dict())
    plain = {key.removeprefix("text_model."): tensor for key, tensor in converted.items()}
    state = {f"text_model.{key}" if wants_prefix else key: tensor for key, tensor in plain.items()}
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
    _check_vocabulary(text_encoder, path)
    return BaseModel(
        unet=unet, vae=vae, text_encoder=text_encoder, source=str(path), kind=f"single file ({path.suffix.lower()})"
    )


# --------------------------------------------------------------------------- diffusers folders


def _weights_variant(directory: Path) -> str | None:
    """None when ``directory`` has full-precision weight files, else the variant its files carry ("fp16")."""
    names = [path.name for path in directory.iterdir() if path.is_file()]
    if any(_PLAIN_WEIGHTS.fullmatch(name) for name in names):
        return None
    matches = [match for name in names if (match := _VARIANT_WEIGHTS.fullmatch(name))]
    variants = sorted({match["variant"] or match["index_variant"] for match in matches})
    return "fp16" if "fp16" in variants else next(iter(variants), None)


def _from_pretrained(model_class, folder: Path, component: str, what: str):
    """``model_class.from_pretrained`` of ``folder/component``, offline, strict, in float32 memory of its own."""
    directory = folder / component
    variant = _weights_variant(directory)
    # Saying which format is there spares the library's logged error before it falls back to .bin.
    safetensors = any(".safetensors" in path.name and (variant or "") in path.name for path in directory.iterdir())
    try:
        model, info = model_class.from_pretrained(
            folder,
            subfolder=component,
            local_files_only=True,
            variant=variant,
            use_safetensors=safetensors,
            output_loading_info=True,
        )
    except pickle.UnpicklingError:
        raise BaseModelError(
            f"{directory}: the {what} cannot be loaded: a .bin file there was refused, it contains code or Python "
            "objects (weights are read with torch.load(weights_only=True); nothing in it was run). "
            "A .safetensors copy avoids this"
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as error:
        raise BaseModelError(
            f"{directory}: the {what} cannot be loaded ({_first_line(error)}); {SD21_BASE_HINT}"
        ) from None
    # transformers lists CLIP's non-persistent position ids among the keys a file lacks or adds.
    problems = {
        kind: [key for key in info.get(kind, []) if not str(key).endswith("position_ids")]
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        found = "; ".join(f"{kind.replace('_', ' ')}: {_examples(keys)}" for kind, keys in problems.items() if keys)
        raise BaseModelError(f"{directory}: the {what} weights do not match its config ({found}); {SD21_BASE_HINT}")
    return _finish(_into_own_float32_memory(model))


def _load_folder(folder: Path) -> BaseModel:
    identity = identify_model_file(folder)
    if not identity.is_sd2:
        raise BaseModelError(_refusal(folder, identity))
    for note in identity.notes:
        logger.warning("%s: %s", folder, note)
    unet = _from_pretrained(UNet2DConditionModel, folder, "unet", "U-Net")
    vae = _from_pretrained(AutoencoderKL, folder, "vae", "VAE")
    text_encoder = _from_pretrained(CLIPTextModel, folder, "text_encoder", "text encoder")
    _check_vocabulary(text_encoder, folder / "text_encoder")
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, source=str(folder), kind="diffusers folder")


# --------------------------------------------------------------------------- entry points


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


def check_base_model(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None) -> ModelIdentity:
    """What ``path`` looks like; when that is a usable SD 2.x model, proven by loading it (then let go).

    Raises ``BaseModelError`` (or ``ModelFileError`` when it cannot be identified at all) when it does not load.
    """
    path = Path(path).expanduser()
    identity = identify_model_file(path.parent if path.name == "model_index.json" else path)
    if identity.is_sd2:
        load_base_model(path, config_dir=config_dir)  # raises when it does not load; the model is let go
    return identity
