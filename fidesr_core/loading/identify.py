"""What a model file or folder is, from key names, shapes, metadata and JSON configs, never tensor data.

A single file: our weights, else diffusers' ``infer_diffusers_model_type`` (on meta tensors), else an LDM U-Net,
else key names, the first answer standing.  Only a complete SD 2.x text-to-image model is accepted (``is_sd2``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from ..errors import ModelFileError
from ..networks.families import FAMILY_NAMES
from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, Container, Header, read_header
from .layouts import family_of


class ModelFamily(str, Enum):
    """What a model file or folder holds."""

    SD2 = "sd2"
    SD2_768_V = "sd2-768-v"
    SD2_VARIANT = "sd2-variant"  # inpainting, depth, x4 upscaler, unCLIP...: not text-to-image
    SD1 = "sd1"
    SDXL = "sdxl"
    OTHER_MODEL = "other-model"  # SD 3, Flux and the other models diffusers knows
    CONTROLNET = "controlnet"
    LORA = "lora"
    EMBEDDING = "embedding"
    MODEL_PART = "model-part"  # a lone VAE, U-Net or text encoder
    FIDESR_WEIGHTS = "fidesr-weights"
    PISA_SR_WEIGHTS = "pisa-sr-weights"
    OSEDIFF_WEIGHTS = "osediff-weights"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value

    @property
    def is_base_model(self) -> bool:
        """(A part of) a diffusion base model: it belongs in the base-model input, whichever model it is."""
        return self.value in ("sd2", "sd2-768-v", "sd2-variant", "sd1", "sdxl", "other-model", "model-part")


@dataclass(frozen=True)
class ModelIdentity:
    """What a model file or folder looks like; ``is_sd2``: ``load_base_model`` accepts it.
    ``description``: a phrase for messages, e.g. "an SD 1.x checkpoint (text context 768)"."""

    family: ModelFamily
    container: Container
    description: str
    is_sd2: bool = False
    notes: tuple[str, ...] = ()


_UNET = "model.diffusion_model."
_CONV_IN = _UNET + "input_blocks.0.0.weight"  # [320, input channels, 3, 3]
_VARIANTS = {9: "inpainting", 5: "depth", 7: "x4-upscaler", 8: "instruct-pix2pix"}  # by U-Net input channels
# infer_diffusers_model_type's answers left to the U-Net checks ("v1" is also its answer for anything unknown).
_UNET_TYPES = {"v1", "v2", "inpainting", "inpainting_v2", "instruct-pix2pix"}
# Its other answers, by prefix: (family, what the file is).
_DIFFUSERS_NAMES = (
    ("xl_", ModelFamily.SDXL, "an SDXL"),
    ("playground", ModelFamily.SDXL, "a Playground v2.5 (SDXL)"),
    ("upscale", ModelFamily.SD2_VARIANT, "an SD x4-upscaler"),
    ("controlnet", ModelFamily.CONTROLNET, "a ControlNet"),
    ("sd35", ModelFamily.OTHER_MODEL, "a Stable Diffusion 3.5"),
    ("sd3", ModelFamily.OTHER_MODEL, "a Stable Diffusion 3"),
    ("flux", ModelFamily.OTHER_MODEL, "a Flux"),
)
_LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".lora.", "lora_mid", "hada_w1", "lokr_w1")
_768_V = (
    "the file name or metadata suggests the SD 2.x 768-v model (v-prediction, 768 px), which its weights cannot be "
    "told apart from; FiDeSR was trained on 2.1-base (epsilon, 512 px) and gives wrong results with 768-v weights"
)


def _has(header: Header, *fragments: str) -> bool:
    return any(fragment in key for key in header.shapes for fragment in fragments)


# What the key names tell when nothing above did: (family, description, test), the first that holds.
_BY_KEY_NAMES: tuple[tuple[ModelFamily, str, Callable[[Header], bool]], ...] = (
    (ModelFamily.EMBEDDING, "a textual-inversion embedding, not a model", lambda h: _has(h, "string_to_param", "emb_params") or "string_to_param" in h.top_keys),
    (ModelFamily.LORA, "a LoRA / LyCORIS file (low-rank deltas), not a full model", lambda h: _has(h, *_LORA_MARKERS)),
    (ModelFamily.MODEL_PART, "a VAE-only file (no U-Net or text encoder)", lambda h: _has(h, "encoder.conv_in.weight") and _has(h, "decoder.conv_out")),
    (ModelFamily.MODEL_PART, "a lone diffusers U-Net weights file: load the whole diffusers folder instead", lambda h: "conv_in.weight" in h.shapes and _has(h, "time_embedding.")),
    (ModelFamily.MODEL_PART, "a text-encoder-only file", lambda h: _has(h, "encoder.layers.", "resblocks.", "text_model.")),
    (ModelFamily.UNKNOWN, "a file without tensors", lambda h: not h.shapes),
)  # fmt: skip


def _found(*checks: tuple[str, bool]) -> list[str]:
    return [reason for reason, holds in checks if holds]


def _diffusers_type(shapes: dict[str, tuple[int, ...]]) -> str:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        return infer_diffusers_model_type({key: torch.empty(shape, device="meta") for key, shape in shapes.items()})
    except Exception:  # noqa: BLE001 - a branch that reads tensor values or a half-known layout: not recognised
        return "v1"


def _sd_refusal(word: str, container: Container, sd1: list[str], channels: int, unclip: bool) -> ModelIdentity | None:
    """SD 1.x, a variant whose U-Net does not take 4 channels, or unCLIP; None for SD 2.x text-to-image."""
    family, version = (ModelFamily.SD1, "SD 1.x") if sd1 else (ModelFamily.SD2_VARIANT, "SD 2.x")
    if channels != 4:
        variant = _VARIANTS.get(channels, "other-input")
        description = f"an {version} {variant} {word} ({channels} input channels; the text-to-image model takes 4)"
        return ModelIdentity(family, container, description)
    if sd1:
        return ModelIdentity(family, container, f"an SD 1.x {word} ({', '.join(sd1)})")
    return ModelIdentity(family, container, f"an SD 2.x unCLIP {word} (image-embedding label_emb)") if unclip else None


def _sd2(container: Container, word: str, context: object, notes: list[str], missing: list[str]) -> ModelIdentity:
    """SD 2.x, usable when nothing is ``missing``; ``notes`` are warnings to log when it loads."""
    if context != 1024:
        notes.insert(0, f"text context {context} differs from SD 2.1-base (1024): not the released model's sizes")
    complete = f"an SD 2.x {word} (text context {context})"
    description = f"an incomplete SD 2.x checkpoint (no {', '.join(missing)})" if missing else complete
    return ModelIdentity(ModelFamily.SD2, container, description, not missing, tuple(notes))


def _ldm_checkpoint(header: Header) -> ModelIdentity | None:
    """The verdict on an original-layout (LDM) checkpoint; None when the file has no such U-Net."""
    shapes, container = header.shapes, header.container
    if _CONV_IN not in shapes:
        return None
    unet = {key: shape for key, shape in shapes.items() if key.startswith(_UNET)}
    context = next((s[1] for k, s in unet.items() if k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    label_emb = any(key.startswith(_UNET + "label_emb.") for key in unet)
    if sdxl := _found(
        ("conditioner.embedders", _has(header, "conditioner.embedders.")),
        (f"text context {context}", label_emb and context in (1280, 2048)),
    ):
        return ModelIdentity(ModelFamily.SDXL, container, f"an SDXL checkpoint ({', '.join(sdxl)})")
    sd1 = _found(
        ("text context 768", context == 768),
        ("conv proj_in", any(k.endswith(".proj_in.weight") and len(s) == 4 for k, s in unet.items())),
        ("CLIP ViT-L text encoder cond_stage_model.transformer", _has(header, "cond_stage_model.transformer.")),
    )
    if refused := _sd_refusal("checkpoint", container, sd1, shapes[_CONV_IN][1], label_emb):
        return refused
    if context is None:
        return ModelIdentity(ModelFamily.UNKNOWN, container, "an original-layout U-Net without cross-attention")
    meta = header.metadata
    ema = "the file also holds EMA weights (model_ema.*); the model.diffusion_model.* weights are used"
    named_768 = "768" in header.path.name + meta.get("modelspec.architecture", "")
    notes = _found(
        (ema, sum(k.startswith("model_ema.") for k in shapes) > 100),
        (_768_V, named_768 or meta.get("modelspec.prediction_type") == "v"),
    )
    missing = _found(
        ("VAE (first_stage_model.*)", not any(key.startswith("first_stage_model.") for key in shapes)),
        ("text encoder (cond_stage_model.model.*)", not _has(header, "cond_stage_model.model.transformer.resblocks.")),
    )
    return _sd2(container, "text-to-image checkpoint", context, notes, missing)


def identify_header(header: Header) -> ModelIdentity:
    """What a single file is, from what ``read_header`` found (in the order of this module's docstring)."""
    container = header.container
    if family := family_of(header):
        description = f"{FAMILY_NAMES[family]} weights, not a base model: give them as the weights (--weights)"
        return ModelIdentity(ModelFamily(f"{family}-weights"), container, description)
    kind = _diffusers_type(header.shapes)
    if kind not in _UNET_TYPES:
        default = (ModelFamily.OTHER_MODEL, f"a {kind} (as diffusers names it)")
        family, name = next(((f, n) for prefix, f, n in _DIFFUSERS_NAMES if kind.startswith(prefix)), default)
        return ModelIdentity(family, container, f"{name} checkpoint, not SD 2.x")
    if identity := _ldm_checkpoint(header):
        return identity
    for family, description, holds in _BY_KEY_NAMES:
        if holds(header):
            return ModelIdentity(family, container, description)
    examples = ", ".join(sorted(header.shapes)[:3])
    description = f"no Stable Diffusion checkpoint we recognise (keys such as {examples})"
    return ModelIdentity(ModelFamily.UNKNOWN, container, description)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (a folder's configs); ModelFileError otherwise."""
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
    if not any(path.name.endswith((".safetensors", ".bin", ".index.json")) for path in directory.iterdir()):
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
    return ModelIdentity(ModelFamily.UNKNOWN, Container.FOLDER, description)


def _identify_folder(folder: Path) -> ModelIdentity:
    kind = Container.DIFFUSERS_FOLDER
    index = folder / "model_index.json"
    pipeline = str(read_json_object(index).get("_class_name", "")) if index.is_file() else ""
    parts = ("unet", "vae", "text_encoder", "transformer", "text_encoder_2")
    present = {name for name in parts if (folder / name).is_dir()}
    if not pipeline and not present - {"text_encoder_2"}:
        return _not_a_diffusers_folder(folder)
    if "XL" in pipeline or {"text_encoder_2", "unet"} <= present:
        return ModelIdentity(ModelFamily.SDXL, kind, f"an SDXL diffusers folder ({pipeline or 'text_encoder_2/'})")
    if "transformer" in present or "StableDiffusion3" in pipeline or "Flux" in pipeline:
        description = f"a diffusion-transformer diffusers folder ({pipeline or 'transformer/'}), not SD 2.x"
        return ModelIdentity(ModelFamily.OTHER_MODEL, kind, description)
    missing = [problem for part in ("unet", "vae", "text_encoder") if (problem := _component_problem(folder, part))]
    if missing:
        return ModelIdentity(
            ModelFamily.UNKNOWN, kind, f"an incomplete diffusers folder (missing {', '.join(missing)})"
        )
    unet = read_json_object(folder / "unet" / "config.json")
    text = read_json_object(folder / "text_encoder" / "config.json")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json_object(scheduler_path) if scheduler_path.is_file() else None
    context = unet.get("cross_attention_dim")
    if unet.get("addition_embed_type") == "text_time":
        return ModelIdentity(ModelFamily.SDXL, kind, "an SDXL diffusers folder (unet addition_embed_type text_time)")
    sd1 = _found(
        ("text context 768", context == 768),
        ("text encoder hidden size 768", text.get("hidden_size") == 768),
        ("conv proj_in", unet.get("use_linear_projection") is False),
    )
    unclip = bool(unet.get("class_embed_type") or unet.get("num_class_embeds"))
    if refused := _sd_refusal("diffusers folder", kind, sd1, unet.get("in_channels", 4), unclip):
        return refused
    if v_evidence := _found(
        ("scheduler prediction_type v_prediction", (scheduler or {}).get("prediction_type") == "v_prediction"),
        ("unet sample_size 96", unet.get("sample_size") == 96),
    ):
        description = (
            f"an SD 2.x 768-v diffusers folder ({', '.join(v_evidence)}: a v-prediction 768 px model, while FiDeSR "
            "was trained on 2.1-base, epsilon prediction at 512 px)"
        )
        return ModelIdentity(ModelFamily.SD2_768_V, kind, description)
    no_scheduler = "no scheduler/scheduler_config.json: epsilon prediction (2.1-base, not 768-v) is assumed"
    return _sd2(kind, "diffusers folder", context, _found((no_scheduler, scheduler is None)), [])


def identify_model_file(path: str | Path) -> ModelIdentity:
    """What ``path`` (a single file or a diffusers folder) looks like, from headers, key names and configs;
    ``ModelFileError`` when it is missing or cannot be read at all (truncated, damaged, a refused pickle)."""
    path = Path(path).expanduser()
    return _identify_folder(path) if path.is_dir() else identify_header(read_header(path)[0])
