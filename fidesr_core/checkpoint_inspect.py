"""Reading model files without trusting them, and telling what they are.

Single files are ``.safetensors`` (header parsed here, tensors read one by
one into aligned buffers) or pickles (``.ckpt``/``.pt``/``.pth``/``.bin``/``.pkl``)
read only with ``torch.load(weights_only=True)``, memory-mapped when the file
is a zip archive.  Identification looks at key names, shapes and JSON configs
only; the rules for single files live in ``identify_checkpoint`` and its
helpers, those for diffusers folders in ``_identify_folder``.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelFileError
from .open_clip_convert import OPEN_CLIP_PREFIX

__all__ = [
    "ModelIdentity",
    "OpenedCheckpoint",
    "identify_model_file",
    "read_checkpoint_state_dict",
    "open_checkpoint",
    "identify_checkpoint",
    "diffusers_component_files",
    "read_json_object",
]

SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})
CONTAINER_SAFETENSORS = "safetensors"
CONTAINER_PICKLE = "ckpt (pickle)"
CONTAINER_FOLDER = "diffusers folder"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_HEADER_BYTES = 100 * 2**20
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


@dataclass(frozen=True)
class _SafetensorsEntry:
    dtype: str  # safetensors name: "F32", "F16", "BF16", ...
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


@dataclass(eq=False)
class OpenedCheckpoint:
    """A single-file checkpoint whose key names and shapes are known; tensors load on demand.

    safetensors: only the header has been read (``entries``).  Pickles: the
    state dict is in ``tensors``, memory-mapped (``mapped``, cheap to inspect)
    or read into memory (handed over key by key by ``load``).
    """

    path: Path
    container: str
    shapes: dict[str, tuple[int, ...]]
    top_keys: frozenset[str] = frozenset()  # keys of a pickled dict's top level (training outputs)
    metadata: dict[str, str] = field(default_factory=dict)
    entries: dict[str, _SafetensorsEntry] = field(default_factory=dict)
    data_start: int = 0  # safetensors: byte offset of the data section
    tensors: dict[str, torch.Tensor] | None = None
    mapped: bool = False

    def load(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors for ``keys``, cast to ``dtype`` one at a time (no second full copy ever exists).

        Every returned tensor owns fresh, aligned memory.  A pickle read into
        memory hands its tensors over: each key can be loaded once.
        """
        if self.tensors is None:
            return self._read_safetensors(list(keys), dtype)
        if self.mapped:  # copies: weights must not stay backed by the file (replacing it would crash us)
            return {key: self.tensors[key].to(dtype or self.tensors[key].dtype, copy=True) for key in keys}
        return {key: _cast(self.tensors.pop(key), dtype) for key in keys}

    def _read_safetensors(self, keys: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        # Read straight into torch-allocated buffers: safetensors' own reader returns unaligned
        # tensors, and copying those fragments the heap (measured: +2 GB RSS kept after a 5 GB load).
        loaded = {}
        with open(self.path, "rb") as handle:
            for key in keys:
                entry = self.entries[key]
                torch_dtype = _SAFETENSORS_DTYPES.get(entry.dtype)
                if torch_dtype is None:
                    raise ModelFileError(f"{self.path}: tensor {key} has the unsupported dtype {entry.dtype}")
                size = entry.end - entry.begin
                expected = math.prod(entry.shape) * torch.empty((), dtype=torch_dtype).element_size()
                if size != expected:
                    raise ModelFileError(f"{self.path}: tensor {key} has {size} bytes for shape {entry.shape}: damaged")  # fmt: skip
                buffer = torch.empty(size, dtype=torch.uint8)
                handle.seek(self.data_start + entry.begin)
                if size and handle.readinto(memoryview(buffer.numpy())) != size:
                    raise ModelFileError(f"{self.path} ends inside tensor {key}: the file is truncated")
                loaded[key] = _cast(buffer.view(torch_dtype).reshape(entry.shape), dtype)
        return loaded

    def release(self) -> None:
        """Drop the pickled state dict (tensors already handed out stay valid)."""
        self.tensors = None


_SAFETENSORS_DTYPES = {
    name: getattr(torch, attribute)
    for name, attribute in (("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
                            ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
                            ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attribute)
}  # fmt: skip


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


# --------------------------------------------------------------------------- reading files


def _read_safetensors_header(path: Path) -> OpenedCheckpoint:
    """Key shapes, offsets and ``__metadata__`` of a safetensors file, reading only its header.

    Checks that the header is well formed and that the file is long enough for
    the tensors it describes (a truncated download fails here, not mid-load).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelFileError(f"{path} has {size} bytes, too few for a safetensors file (empty or truncated)")
        if prefix.startswith(_ZIP_MAGIC):
            raise ModelFileError(f"{path} is a PyTorch zip checkpoint, not safetensors: rename it to .ckpt")
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise ModelFileError(
                f"{path} is not a valid safetensors file: its header length field says {header_bytes} bytes "
                f"but the file has {size} (damaged, truncated or another format)"
            )
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path} is not a valid safetensors file: its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a valid safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = metadata if isinstance(metadata, dict) else {}
    entries: dict[str, _SafetensorsEntry] = {}
    for key, info in header.items():
        try:
            begin, end = (int(offset) for offset in info["data_offsets"])
            entries[key] = _SafetensorsEntry(str(info["dtype"]), tuple(int(n) for n in info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{path}: safetensors header entry {key!r} is malformed") from error
    data_end = max((entry.end for entry in entries.values()), default=0)
    if 8 + header_bytes + data_end > size:
        raise ModelFileError(
            f"{path} is truncated: its header describes {8 + header_bytes + data_end} bytes, "
            f"the file has {size} (incomplete download or copy?)"
        )
    return OpenedCheckpoint(
        path,
        CONTAINER_SAFETENSORS,
        {key: entry.shape for key, entry in entries.items()},
        metadata={str(key): str(value) for key, value in metadata.items()},
        entries=entries,
        data_start=8 + header_bytes,
    )


def _torch_load(path: Path, mmap: bool) -> Any:
    """``torch.load`` restricted to tensors and plain containers; every failure becomes ModelFileError."""
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL\s+([\w.]+)", str(error))
        if refused:
            raise ModelFileError(
                f"{path} was refused: it is a pickle that asks for the Python object {refused.group(1)!r}, "
                "and model files are only read with torch.load(weights_only=True), which allows tensors "
                "and plain containers only (nothing in it was run). Use a .safetensors copy of the model instead"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(error))
        detail = reason.group(1).strip() if reason else type(error).__name__
        raise ModelFileError(
            f"{path} is not a readable PyTorch checkpoint ({detail}): damaged, or not written by torch.save"
        ) from None
    except EOFError:
        raise ModelFileError(f"{path} ends too early: the file is truncated (incomplete download or copy?)") from None
    except RuntimeError as error:
        if "zip archive" in str(error) or "central directory" in str(error):
            raise ModelFileError(
                f"{path} is a damaged or truncated PyTorch zip checkpoint (incomplete download or copy?)"
            ) from None
        raise ModelFileError(f"{path} cannot be read as a PyTorch checkpoint ({str(error)[:200]})") from None
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error})") from None


def _sniff_container(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return CONTAINER_SAFETENSORS
    if suffix in PICKLE_SUFFIXES:
        return CONTAINER_PICKLE
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":  # zip archive or pickle protocol >= 2
        return CONTAINER_PICKLE
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length then JSON
        return CONTAINER_SAFETENSORS
    if head.startswith(b"GGUF"):
        raise ModelFileError(f"{path} is a GGUF (quantised) file; only .safetensors and .ckpt checkpoints are read")
    raise ModelFileError(
        f"{path} is not a model file this loader reads (expected .safetensors, or .ckpt/.pt/.pth/.bin/.pkl)"
    )


def open_checkpoint(path: str | Path, *, mmap: bool = True) -> OpenedCheckpoint:
    """Open a single-file checkpoint: the header of a safetensors file, or a weights-only load of a pickle.

    ``mmap`` (zip pickles): map the file instead of reading it, cheap for
    inspection; loaders pass False, so tensors are read once and handed over.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a checkpoint file")
    if _sniff_container(path) == CONTAINER_SAFETENSORS:
        return _read_safetensors_header(path)
    with open(path, "rb") as handle:
        mapped = mmap and handle.read(4) == _ZIP_MAGIC  # legacy (non-zip) torch.save files cannot be mapped
    loaded = _torch_load(path, mapped)
    if not isinstance(loaded, dict):
        raise ModelFileError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors: not a model checkpoint")
    top_keys = frozenset(str(key) for key in loaded)
    state: Any = loaded
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style {"state_dict": {...}, "global_step": ...}
    tensors = {key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    return OpenedCheckpoint(path, CONTAINER_PICKLE, shapes, top_keys=top_keys, tensors=tensors, mapped=mapped)


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


def _training_output(checkpoint: OpenedCheckpoint) -> ModelIdentity | None:
    """FiDeSR / PiSA-SR / OSEDiff weight files (SPEC §6), pickled or as safetensors."""
    top, keys, container = checkpoint.top_keys, checkpoint.shapes.keys(), checkpoint.container
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
        return _refused("sdxl", container, f"an SDXL {kind} checkpoint (conditioner.embedders, label_emb, text context {context})")  # fmt: skip
    sd1_evidence = _found((
        ("text context 768", context == 768),
        ("conv proj_in", proj_in is not None and len(proj_in) == 4),
        ("CLIP ViT-L text encoder cond_stage_model.transformer", _has(shapes, "cond_stage_model.transformer.")),
    ))  # fmt: skip
    base, version = ("sd1", "SD 1.x") if sd1_evidence else ("sd2", "SD 2.x")
    if in_channels != 4:
        variant = _CHANNEL_VARIANTS.get(in_channels, f"{in_channels}-channel")
        description = f"an {version} {variant} checkpoint (conv_in takes {in_channels} input channels; {_NOT_4_CHANNELS})"  # fmt: skip
        return _refused(f"{base}-{variant}", container, description)
    if sd1_evidence:
        return _refused("sd1", container, f"an SD 1.x checkpoint ({', '.join(sd1_evidence)})")
    if label_emb:
        return _refused("sd2-unclip", container, "an SD 2.x unCLIP checkpoint (image-embedding label_emb)")

    missing = _found((
        ("VAE (first_stage_model.*)", not _has(shapes, VAE_PREFIX)),
        ("text encoder (cond_stage_model.model.*)", not _has(shapes, OPEN_CLIP_PREFIX + "transformer.resblocks.")),
    ))  # fmt: skip
    notes = _found((
        ("missing: " + ", ".join(missing), bool(missing)),
        (_SIZE_NOTE.format(context), context not in (None, 1024)),
        ("the file also holds EMA weights (model_ema.*); the model.diffusion_model.* weights are used",
         sum(key.startswith("model_ema.") for key in shapes) > 100),
    )) + _768_hints(checkpoint)  # fmt: skip
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
        return _refused(family, CONTAINER_FOLDER, f"a diffusion-transformer diffusers folder ({pipeline or 'transformer/'}), not SD 2.x")  # fmt: skip
    missing = [problem for component in _COMPONENTS if (problem := _component_problem(folder, component))]
    if missing:
        return _refused("unknown", CONTAINER_FOLDER, f"an incomplete diffusers folder (missing {', '.join(missing)})", ["missing: " + ", ".join(missing)])  # fmt: skip

    unet = read_json_object(folder / "unet" / "config.json")
    text = read_json_object(folder / "text_encoder" / "config.json")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json_object(scheduler_path) if scheduler_path.is_file() else None
    prediction = scheduler.get("prediction_type", "epsilon") if scheduler is not None else None
    context, in_channels = unet.get("cross_attention_dim"), unet.get("in_channels", 4)
    if unet.get("addition_embed_type") == "text_time":
        return _refused("sdxl", CONTAINER_FOLDER, "an SDXL diffusers folder (unet addition_embed_type text_time)")
    sd1_evidence = _found((
        ("text context 768", context == 768),
        ("text encoder hidden size 768", text.get("hidden_size") == 768),
        ("conv proj_in", unet.get("use_linear_projection") is False),
    ))  # fmt: skip
    base, version = ("sd1", "SD 1.x") if sd1_evidence else ("sd2", "SD 2.x")
    if in_channels != 4:
        variant = _CHANNEL_VARIANTS.get(in_channels, f"{in_channels}-channel")
        description = f"an {version} {variant} diffusers folder (unet in_channels {in_channels}; {_NOT_4_CHANNELS})"
        return _refused(f"{base}-{variant}", CONTAINER_FOLDER, description)
    if sd1_evidence:
        return _refused("sd1", CONTAINER_FOLDER, f"an SD 1.x diffusers folder ({', '.join(sd1_evidence)})")
    if unet.get("class_embed_type") or unet.get("num_class_embeds"):
        return _refused("sd2-unclip", CONTAINER_FOLDER, "an SD 2.x unCLIP diffusers folder (unet class embedding)")
    v_evidence = _found((
        ("scheduler prediction_type v_prediction", prediction == "v_prediction"),
        ("unet sample_size 96", unet.get("sample_size") == 96),
    ))  # fmt: skip
    if v_evidence:
        description = f"an SD 2.x 768-v diffusers folder ({', '.join(v_evidence)}: a v-prediction 768 px model, while FiDeSR was trained on 2.1-base, epsilon prediction at 512 px)"  # fmt: skip
        return _refused("sd2-768-v", CONTAINER_FOLDER, description)
    notes = _found((
        (_SIZE_NOTE.format(context), context != 1024),
        ("no scheduler/scheduler_config.json: epsilon prediction (2.1-base, not 768-v) is assumed", scheduler is None),
    ))  # fmt: skip
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
