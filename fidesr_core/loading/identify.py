"""Telling what a model file or folder is, from key names, shapes and JSON configs only.

The rules for single files live in ``identify_checkpoint`` and its helpers,
those for diffusers folders in ``_identify_folder``.  Opening single files
(safetensors headers, weights-only pickles) lives in ``checkpoint_files``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError
from .checkpoint_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, OpenedCheckpoint, open_checkpoint
from .open_clip_convert import OPEN_CLIP_PREFIX

__all__ = [
    "ModelIdentity",
    "identify_model_file",
    "read_checkpoint_state_dict",
    "identify_checkpoint",
    "diffusers_component_files",
    "read_json_object",
]

CONTAINER_FOLDER = "diffusers folder"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_COMPONENTS = ("unet", "vae", "text_encoder")


@dataclass
class ModelIdentity:
    """What a model file or folder looks like.

    ``family``: "sd2", "sd2-768-v", "sd2-inpainting", "sd2-depth", "sd2-x4-upscaler",
    "sd2-unclip", "sd1", "sd1-inpainting", "sdxl", "sd3", "flux", "dit", "controlnet",
    "vae-only", "unet-only", "text-encoder-only", "lora", "embedding",
    "fidesr-weights", "pisa-sr-weights", "osediff-weights" or "unknown".
    ``is_sd2``: ``load_base_model`` accepts it (an SD 2.x text-to-image model with all parts).
    ``description``: a phrase for messages, e.g. "an SD 1.x checkpoint (text context 768)".
    """

    family: str
    container: str
    is_sd2: bool
    notes: list[str] = field(default_factory=list)
    description: str = ""


def read_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file checkpoint as stored (``state_dict`` nesting unwrapped)."""
    checkpoint = open_checkpoint(path, mmap=False)
    if not checkpoint.shapes:
        what = identify_checkpoint(checkpoint)
        found = f" (it looks like {what.description})" if what.family != "unknown" else ""
        raise ModelFileError(f"{checkpoint.path} holds no tensors{found}: not a model checkpoint")
    return checkpoint.load(checkpoint.shapes)


# --------------------------------------------------------------------------- single files

_LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".lora.", "lora_mid", "hada_w1", "lokr_w1")
_TRAINING_HINT = "give it as the FiDeSR weights (fidesr_weights input, --weights), not as the base model"
_CHANNEL_VARIANTS = {9: "inpainting", 5: "depth", 7: "x4-upscaler", 8: "instruct-pix2pix"}
_NOT_4_CHANNELS = "the text-to-image model takes 4"
_SIZE_NOTE = "text context {} differs from SD 2.1-base (1024): not the released model's sizes"


def _refused(family: str, container: str, description: str, notes: list[str] | None = None) -> ModelIdentity:
    return ModelIdentity(family, container, False, notes or [], description)


def _has(keys: Iterable[str], *fragments: str) -> bool:
    return any(fragment in key for key in keys for fragment in fragments)


def _first_shape(shapes: dict[str, tuple[int, ...]], suffix: str) -> tuple[int, ...] | None:
    """Shape of the first U-Net key ending in ``suffix``."""
    return next((s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith(suffix)), None)


def _found(checks: Iterable[tuple[str, bool]]) -> list[str]:
    return [reason for reason, found in checks if found]


def _not_sd2_text_to_image(
    sd1_evidence: list[str], in_channels: int, container: str, what: str, channels: str
) -> ModelIdentity | None:
    """The refusal of an SD 1.x model or a variant whose U-Net does not take 4 channels; None otherwise.

    ``what`` names the container ("checkpoint", "diffusers folder"), ``channels`` says where
    ``in_channels`` was read.
    """
    base, version = ("sd1", "SD 1.x") if sd1_evidence else ("sd2", "SD 2.x")
    if in_channels != 4:
        variant = _CHANNEL_VARIANTS.get(in_channels, f"{in_channels}-channel")
        description = f"an {version} {variant} {what} ({channels}; {_NOT_4_CHANNELS})"
        return _refused(f"{base}-{variant}", container, description)
    if sd1_evidence:
        return _refused("sd1", container, f"an SD 1.x {what} ({', '.join(sd1_evidence)})")
    return None


def _training_output(checkpoint: OpenedCheckpoint) -> ModelIdentity | None:
    """FiDeSR / PiSA-SR / OSEDiff weight files (docs/algorithm.md §6), pickled or as safetensors."""
    top, keys, container = checkpoint.top_keys, checkpoint.shapes.keys(), checkpoint.container
    marker = checkpoint.metadata.get("fidesr.format")  # this package's .safetensors say their family
    if marker == "pisa-sr-weights":
        return _refused("pisa-sr-weights", container, "PiSA-SR weights (pixel/semantic LoRA), not a base model")
    if marker == "osediff-weights":
        return _refused("osediff-weights", container, "OSEDiff weights (U-Net and VAE LoRA), not a base model")
    if "lrrb_state_dict" in top or _has(keys, "lrrb"):
        return _refused("fidesr-weights", container, f"FiDeSR weights (LoRA + LRRB): {_TRAINING_HINT}")
    if "lora_rank_unet_pix" in top or _has(keys, "default_encoder_pix", "default_others_sem"):
        return _refused("pisa-sr-weights", container, "PiSA-SR weights (pixel/semantic LoRA), not a base model")
    if "state_dict_vae" in top or "rank_vae" in top:
        return _refused("osediff-weights", container, "OSEDiff weights (U-Net and VAE LoRA), not a base model")
    if "state_dict_unet" in top or _has(keys, ".default_encoder.", ".default_decoder.", ".default_others."):
        return _refused("fidesr-weights", container, f"FiDeSR LoRA weights: {_TRAINING_HINT}")
    return None


def _768_hints(checkpoint: OpenedCheckpoint) -> list[str]:
    architecture = checkpoint.metadata.get("modelspec.architecture", "")
    prediction = checkpoint.metadata.get("modelspec.prediction_type", "")
    if "768" in checkpoint.path.name or "768" in architecture or prediction == "v":
        return [
            "the file name or metadata suggests the SD 2.x 768-v model (v-prediction, 768 px), which its weights "
            "cannot be told apart from; FiDeSR was trained on 2.1-base (epsilon, 512 px) and gives wrong results "
            "with 768-v weights"
        ]
    return []


def _ldm_unet_identity(checkpoint: OpenedCheckpoint) -> ModelIdentity:
    """An LDM-layout U-Net checkpoint (``model.diffusion_model.input_blocks...``): SD 1.x, 2.x or XL."""
    shapes, container = checkpoint.shapes, checkpoint.container
    in_channels = shapes[UNET_PREFIX + "input_blocks.0.0.weight"][1]
    key_shape = _first_shape(shapes, "attn2.to_k.weight")  # [inner, context]
    context = key_shape[1] if key_shape and len(key_shape) == 2 else None
    proj_in = _first_shape(shapes, ".proj_in.weight")
    label_emb = _has(shapes, UNET_PREFIX + "label_emb.")
    if _has(shapes, "conditioner.embedders.") or (label_emb and context in (1280, 2048)):
        kind = "refiner" if context == 1280 else "base"
        return _refused(
            "sdxl", container, f"an SDXL {kind} checkpoint (conditioner.embedders, label_emb, text context {context})"
        )
    sd1_evidence = _found(
        (
            ("text context 768", context == 768),
            ("conv proj_in", proj_in is not None and len(proj_in) == 4),
            ("CLIP ViT-L text encoder cond_stage_model.transformer", _has(shapes, "cond_stage_model.transformer.")),
        )
    )
    channels = f"conv_in takes {in_channels} input channels"
    if refused := _not_sd2_text_to_image(sd1_evidence, in_channels, container, "checkpoint", channels):
        return refused
    if label_emb:
        return _refused("sd2-unclip", container, "an SD 2.x unCLIP checkpoint (image-embedding label_emb)")

    missing = _found(
        (
            ("VAE (first_stage_model.*)", not _has(shapes, VAE_PREFIX)),
            ("text encoder (cond_stage_model.model.*)", not _has(shapes, OPEN_CLIP_PREFIX + "transformer.resblocks.")),
        )
    )
    notes = _found(
        (
            ("missing: " + ", ".join(missing), bool(missing)),
            (_SIZE_NOTE.format(context), context not in (None, 1024)),
            (
                "the file also holds EMA weights (model_ema.*); the model.diffusion_model.* weights are used",
                sum(key.startswith("model_ema.") for key in shapes) > 100,
            ),
        )
    ) + _768_hints(checkpoint)
    if missing:
        return _refused("sd2", container, f"an incomplete SD 2.x checkpoint (no {' and no '.join(missing)})", notes)
    return ModelIdentity("sd2", container, True, notes, f"an SD 2.x text-to-image checkpoint (text context {context})")


def identify_checkpoint(checkpoint: OpenedCheckpoint) -> ModelIdentity:
    """Identify an opened single file from its key names and shapes (first matching rule wins)."""
    shapes, container = checkpoint.shapes, checkpoint.container
    keys = shapes.keys()
    trained = _training_output(checkpoint)
    if trained is not None:
        return trained
    if UNET_PREFIX + "input_blocks.0.0.weight" in shapes and not _has(keys, "control_model.", *_LORA_MARKERS):
        return _ldm_unet_identity(checkpoint)
    rules = (
        ("embedding", "a textual-inversion embedding, not a model",
         bool({"string_to_param", "emb_params"} & (checkpoint.top_keys | set(keys)))),
        ("lora", "a LoRA / LyCORIS file (low-rank deltas), not a full model", _has(keys, *_LORA_MARKERS)),
        ("controlnet", "a ControlNet, not a base model",
         _has(keys, "control_model.", "input_hint_block", "controlnet_cond_embedding")),
        ("sd3", "a Stable Diffusion 3 (MMDiT) checkpoint, a transformer rather than a U-Net",
         _has(keys, "joint_blocks.") or _has(keys, "context_embedder.") and _has(keys, "transformer_blocks.")),
        ("flux", "a Flux checkpoint (double_blocks/single_blocks), a transformer rather than a U-Net",
         _has(keys, "double_blocks.", "single_blocks.", "single_transformer_blocks.")),
        ("dit", "a diffusion-transformer (DiT) checkpoint, not an SD 2.x U-Net",
         _has(keys, UNET_PREFIX, "x_embedder.", "t_embedder.", "adaln_single.")),
        ("vae-only", "a VAE-only file (encoder/decoder weights, no U-Net or text encoder)",
         _has(keys, "encoder.conv_in.weight") and _has(keys, "decoder.conv_out.weight")),
        ("unet-only", "a lone diffusers U-Net weights file: load the whole diffusers folder instead",
         "conv_in.weight" in keys and _has(keys, "time_embedding.")),
        ("text-encoder-only", "a text-encoder-only file",
         _has(keys, "encoder.layers.", "transformer.resblocks.", "text_model.")),
        ("unknown", "a file without tensors", not shapes),
    )  # fmt: skip
    for family, description, matches in rules:
        if matches:
            return _refused(family, container, description)
    examples = ", ".join(sorted(keys)[:3])
    return _refused("unknown", container, f"no Stable Diffusion checkpoint we recognise (keys such as {examples})")


# --------------------------------------------------------------------------- diffusers folders

_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_BIN_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "pytorch_model"}


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (configs, shard indexes); ModelFileError otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path} cannot be read as JSON ({error})") from error
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} is not a JSON object")
    return value


def diffusers_component_files(folder: Path, component: str) -> list[Path]:
    """Weight files of ``folder/component`` in diffusers naming (full precision preferred; shards resolved)."""
    directory = folder / component
    for variant in ("", ".fp16"):
        for stem, extension in ((_WEIGHT_STEMS[component], ".safetensors"), (_BIN_STEMS[component], ".bin")):
            single = directory / f"{stem}{variant}{extension}"
            if single.is_file():
                return [single]
            index = directory / f"{stem}{variant}{extension}.index.json"
            if index.is_file():
                weight_map = read_json_object(index).get("weight_map", {})
                return [directory / name for name in sorted(set(weight_map.values()))]
    return []


def _component_problem(folder: Path, component: str) -> str | None:
    directory = folder / component
    if not directory.is_dir():
        return f"{component}/ (folder missing)"
    if not (directory / "config.json").is_file():
        return f"{component}/config.json"
    files = diffusers_component_files(folder, component)
    if not files:
        return f"{component}/ weights ({_WEIGHT_STEMS[component]}.safetensors)"
    absent = [path.name for path in files if not path.is_file()]
    return f"{component}/ shards {', '.join(absent)}" if absent else None


def _not_a_diffusers_folder(folder: Path) -> ModelIdentity:
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES)
    if files:
        description = f"a folder of model files ({', '.join(files[:3])}), not a diffusers folder: pass the file itself"
    elif not any(folder.iterdir()):
        description = "an empty folder"
    else:
        description = "a folder without model_index.json or unet/, vae/, text_encoder/ subfolders"
    return _refused("unknown", "folder", description)


def _identify_folder(folder: Path) -> ModelIdentity:
    index_path = folder / "model_index.json"
    pipeline = str(read_json_object(index_path).get("_class_name", "")) if index_path.is_file() else ""
    present = {name for name in (*_COMPONENTS, "transformer", "text_encoder_2") if (folder / name).is_dir()}
    if not pipeline and not present & {*_COMPONENTS, "transformer"}:
        return _not_a_diffusers_folder(folder)
    if "XL" in pipeline or ("text_encoder_2" in present and "unet" in present):
        return _refused("sdxl", CONTAINER_FOLDER, f"an SDXL diffusers folder ({pipeline or 'text_encoder_2/'})")
    if "transformer" in present or "StableDiffusion3" in pipeline or "Flux" in pipeline:
        family = "sd3" if "3" in pipeline else "flux" if "Flux" in pipeline else "dit"
        return _refused(
            family,
            CONTAINER_FOLDER,
            f"a diffusion-transformer diffusers folder ({pipeline or 'transformer/'}), not SD 2.x",
        )
    missing = [problem for component in _COMPONENTS if (problem := _component_problem(folder, component))]
    if missing:
        return _refused(
            "unknown",
            CONTAINER_FOLDER,
            f"an incomplete diffusers folder (missing {', '.join(missing)})",
            ["missing: " + ", ".join(missing)],
        )

    unet = read_json_object(folder / "unet" / "config.json")
    text = read_json_object(folder / "text_encoder" / "config.json")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json_object(scheduler_path) if scheduler_path.is_file() else None
    prediction = scheduler.get("prediction_type", "epsilon") if scheduler is not None else None
    context, in_channels = unet.get("cross_attention_dim"), unet.get("in_channels", 4)
    if unet.get("addition_embed_type") == "text_time":
        return _refused("sdxl", CONTAINER_FOLDER, "an SDXL diffusers folder (unet addition_embed_type text_time)")
    sd1_evidence = _found(
        (
            ("text context 768", context == 768),
            ("text encoder hidden size 768", text.get("hidden_size") == 768),
            ("conv proj_in", unet.get("use_linear_projection") is False),
        )
    )
    channels = f"unet in_channels {in_channels}"
    if refused := _not_sd2_text_to_image(sd1_evidence, in_channels, CONTAINER_FOLDER, "diffusers folder", channels):
        return refused
    if unet.get("class_embed_type") or unet.get("num_class_embeds"):
        return _refused("sd2-unclip", CONTAINER_FOLDER, "an SD 2.x unCLIP diffusers folder (unet class embedding)")
    v_evidence = _found(
        (
            ("scheduler prediction_type v_prediction", prediction == "v_prediction"),
            ("unet sample_size 96", unet.get("sample_size") == 96),
        )
    )
    if v_evidence:
        description = f"an SD 2.x 768-v diffusers folder ({', '.join(v_evidence)}: a v-prediction 768 px model, while FiDeSR was trained on 2.1-base, epsilon prediction at 512 px)"
        return _refused("sd2-768-v", CONTAINER_FOLDER, description)
    notes = _found(
        (
            (_SIZE_NOTE.format(context), context != 1024),
            (
                "no scheduler/scheduler_config.json: epsilon prediction (2.1-base, not 768-v) is assumed",
                scheduler is None,
            ),
        )
    )
    return ModelIdentity("sd2", CONTAINER_FOLDER, True, notes, f"an SD 2.x diffusers folder (text context {context})")


# --------------------------------------------------------------------------- public entry


def identify_model_file(path: str | Path) -> ModelIdentity:
    """What ``path`` (a single file or a diffusers folder) looks like, from headers, key names and configs.

    Raises ``ModelFileError`` when the path is missing or cannot be read at all
    (truncated, damaged, a refused pickle).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"{path} does not exist")
    if path.is_dir():
        return _identify_folder(path)
    return identify_checkpoint(open_checkpoint(path))
