"""Telling what a model file or folder is, from key names, shapes and JSON configs only.

Single files are identified by the rule table in ``file_rules``; diffusers
folders by ``_identify_folder`` from their JSON configs.  Opening single files
(safetensors headers, weights-only pickles) lives in ``checkpoint_files``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelFileError
from .checkpoint_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, Container, OpenedCheckpoint, open_checkpoint
from .file_rules import CHANNEL_VARIANTS, ModelFamily, ModelIdentity, match_file_rules

__all__ = ["identify_model_file", "identify_checkpoint", "read_checkpoint_state_dict", "read_json_object"]

_COMPONENTS = ("unet", "vae", "text_encoder")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")  # diffusers / transformers weight files and shard indexes
_SIZE_NOTE = "text context {} differs from SD 2.1-base (1024): not the released model's sizes"


def identify_checkpoint(checkpoint: OpenedCheckpoint) -> ModelIdentity:
    """Identify an opened single file from its key names, shapes and metadata (``file_rules.FILE_RULES``)."""
    return match_file_rules(checkpoint)


def read_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file checkpoint as stored (``state_dict`` nesting unwrapped)."""
    checkpoint = open_checkpoint(path, mmap=False)
    if not checkpoint.shapes:
        what = identify_checkpoint(checkpoint)
        found = f" (it looks like {what.description})" if what.family is not ModelFamily.UNKNOWN else ""
        raise ModelFileError(f"{checkpoint.path} holds no tensors{found}: not a model checkpoint")
    return checkpoint.load(checkpoint.shapes)


def _refused(family: ModelFamily, container: Container, description: str, notes: tuple[str, ...] = ()) -> ModelIdentity:
    return ModelIdentity(family, container, False, notes, description)


def _found(checks: tuple[tuple[str, bool], ...]) -> list[str]:
    return [reason for reason, found in checks if found]


# --------------------------------------------------------------------------- diffusers folders


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (configs, shard indexes); ModelFileError otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path} cannot be read as JSON ({error})") from error
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} is not a JSON object")
    return value


def _component_problem(folder: Path, component: str) -> str | None:
    """What ``folder/component`` lacks for ``from_pretrained``; which weight file it picks is the library's business."""
    directory = folder / component
    if not directory.is_dir():
        return f"{component}/ (folder missing)"
    if not (directory / "config.json").is_file():
        return f"{component}/config.json"
    if not any(path.name.endswith(_WEIGHT_SUFFIXES) for path in directory.iterdir()):
        return f"{component}/ weights (no .safetensors or .bin file)"
    return None


def _not_a_diffusers_folder(folder: Path) -> ModelIdentity:
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES)
    if files:
        description = f"a folder of model files ({', '.join(files[:3])}), not a diffusers folder: pass the file itself"
    elif not any(folder.iterdir()):
        description = "an empty folder"
    else:
        description = "a folder without model_index.json or unet/, vae/, text_encoder/ subfolders"
    return _refused(ModelFamily.UNKNOWN, Container.FOLDER, description)


def _not_sd2_text_to_image(sd1_evidence: list[str], in_channels: int) -> ModelIdentity | None:
    """The refusal of an SD 1.x folder or of a variant whose U-Net does not take 4 channels; None otherwise."""
    base, version = ("sd1", "SD 1.x") if sd1_evidence else ("sd2", "SD 2.x")
    if in_channels != 4:
        variant = CHANNEL_VARIANTS.get(in_channels)
        family = ModelFamily(f"{base}-{variant or 'other-input'}")
        description = (
            f"an {version} {variant or 'other-input'} diffusers folder "
            f"(unet in_channels {in_channels}; the text-to-image model takes 4)"
        )
        return _refused(family, Container.DIFFUSERS_FOLDER, description)
    if sd1_evidence:
        return _refused(
            ModelFamily.SD1, Container.DIFFUSERS_FOLDER, f"an SD 1.x diffusers folder ({', '.join(sd1_evidence)})"
        )
    return None


def _identify_folder(folder: Path) -> ModelIdentity:
    folder_kind = Container.DIFFUSERS_FOLDER
    index_path = folder / "model_index.json"
    pipeline = str(read_json_object(index_path).get("_class_name", "")) if index_path.is_file() else ""
    present = {name for name in (*_COMPONENTS, "transformer", "text_encoder_2") if (folder / name).is_dir()}
    if not pipeline and not present & {*_COMPONENTS, "transformer"}:
        return _not_a_diffusers_folder(folder)
    if "XL" in pipeline or ("text_encoder_2" in present and "unet" in present):
        return _refused(ModelFamily.SDXL, folder_kind, f"an SDXL diffusers folder ({pipeline or 'text_encoder_2/'})")
    if "transformer" in present or "StableDiffusion3" in pipeline or "Flux" in pipeline:
        family = ModelFamily.SD3 if "3" in pipeline else ModelFamily.FLUX if "Flux" in pipeline else ModelFamily.DIT
        return _refused(
            family,
            folder_kind,
            f"a diffusion-transformer diffusers folder ({pipeline or 'transformer/'}), not SD 2.x",
        )
    missing = [problem for component in _COMPONENTS if (problem := _component_problem(folder, component))]
    if missing:
        return _refused(
            ModelFamily.UNKNOWN,
            folder_kind,
            f"an incomplete diffusers folder (missing {', '.join(missing)})",
            ("missing: " + ", ".join(missing),),
        )

    unet = read_json_object(folder / "unet" / "config.json")
    text = read_json_object(folder / "text_encoder" / "config.json")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json_object(scheduler_path) if scheduler_path.is_file() else None
    prediction = scheduler.get("prediction_type", "epsilon") if scheduler is not None else None
    context, in_channels = unet.get("cross_attention_dim"), unet.get("in_channels", 4)
    if unet.get("addition_embed_type") == "text_time":
        return _refused(ModelFamily.SDXL, folder_kind, "an SDXL diffusers folder (unet addition_embed_type text_time)")
    sd1_evidence = _found(
        (
            ("text context 768", context == 768),
            ("text encoder hidden size 768", text.get("hidden_size") == 768),
            ("conv proj_in", unet.get("use_linear_projection") is False),
        )
    )
    if refused := _not_sd2_text_to_image(sd1_evidence, in_channels):
        return refused
    if unet.get("class_embed_type") or unet.get("num_class_embeds"):
        return _refused(ModelFamily.SD2_UNCLIP, folder_kind, "an SD 2.x unCLIP diffusers folder (unet class embedding)")
    v_evidence = _found(
        (
            ("scheduler prediction_type v_prediction", prediction == "v_prediction"),
            ("unet sample_size 96", unet.get("sample_size") == 96),
        )
    )
    if v_evidence:
        description = f"an SD 2.x 768-v diffusers folder ({', '.join(v_evidence)}: a v-prediction 768 px model, while FiDeSR was trained on 2.1-base, epsilon prediction at 512 px)"
        return _refused(ModelFamily.SD2_768_V, folder_kind, description)
    notes = _found(
        (
            (_SIZE_NOTE.format(context), context != 1024),
            (
                "no scheduler/scheduler_config.json: epsilon prediction (2.1-base, not 768-v) is assumed",
                scheduler is None,
            ),
        )
    )
    description = f"an SD 2.x diffusers folder (text context {context})"
    return ModelIdentity(ModelFamily.SD2, folder_kind, True, tuple(notes), description)


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
