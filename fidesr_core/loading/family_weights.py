"""PiSA-SR and OSEDiff weights files, and ``load_restorer_weights`` for any of the three families.

``pkl``: the authors' ``torch.save`` dicts (docs/algorithm.md §6), read only with
``torch.load(weights_only=True)`` and written in the same layout, so their scripts load ours:

- PiSA-SR ``pisa_sr.pkl``: ``unet_lora_{encoder,decoder,others}_modules_{pix,sem}`` (module lists),
  ``lora_rank_unet_pix``, ``lora_rank_unet_sem`` and ``state_dict_unet`` (both sets' tensors, adapters
  ``default_{encoder,decoder,others}_{pix,sem}``);
- OSEDiff ``osediff.pkl``: ``unet_lora_{encoder,decoder,others}_modules``, ``rank_unet``, ``rank_vae``,
  ``vae_lora_encoder_modules``, ``state_dict_unet`` (the LoRA tensors and the trained ``conv_in``, named
  ``conv_in.base_layer.*`` when ``conv_in`` carries a LoRA, as peft names it) and ``state_dict_vae``.

``safetensors``: ours, version 1, string metadata ``fidesr.format`` = ``"pisa-sr-weights"`` or
``"osediff-weights"`` (the family), ``fidesr.format_version`` = ``"1"``, the ranks under the pkl
key names (``fidesr.lora_rank_unet_pix`` ..., ``fidesr.rank_unet`` ...), the alphas
(``fidesr.lora_alpha_pix`` ..., ``fidesr.lora_alpha_unet`` ...) and each module list under its pkl
key as JSON.  Tensors: ``unet_lora.<peft name>``, and for OSEDiff ``unet_conv_in.weight``,
``unet_conv_in.bias`` and ``vae_lora.<peft name>``.  Other metadata keys are free-form; ``fidesr.*``
is reserved.  FiDeSR's own files are ``loading.weights``'; ``loading.describe_weights`` summarises any of them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import safetensors
import safetensors.torch
import torch

from ..errors import ModelFileError, SettingsError, WeightsFileError
from ..networks.families import (
    FAMILY_NAMES,
    OSEDIFF_UNET_ADAPTERS,
    OSEDIFF_VAE_ADAPTER,
    PISA_SR_PIXEL_ADAPTERS,
    PISA_SR_SEMANTIC_ADAPTERS,
    LoraSet,
    OSEDiffWeights,
    PiSASRWeights,
)
from ..networks.lora import RELEASED_LORA_ALPHA
from ..networks.model import FiDeSRWeights
from .checkpoint_files import (
    Container,
    OpenedCheckpoint,
    container_by_content,
    read_safetensors_header,
    state_dict_tensors,
)
from .family_validation import validate_osediff_weights, validate_pisa_sr_weights
from .file_rules import ModelFamily
from .identify import identify_checkpoint
from .safe_torch_load import load_tensors_only
from .weights import load_fidesr_weights, save_fidesr_weights
from .weights_writing import compact_cpu_copy, weights_format_of, write_weights_file

__all__ = [
    "PISA_SR_FORMAT_MARKER",
    "OSEDIFF_FORMAT_MARKER",
    "FAMILY_FORMAT_VERSION",
    "RestorerWeights",
    "load_restorer_weights",
    "save_restorer_weights",
    "convert_restorer_weights",
]

RestorerWeights = FiDeSRWeights | PiSASRWeights | OSEDiffWeights
PISA_SR_FORMAT_MARKER = "pisa-sr-weights"
OSEDIFF_FORMAT_MARKER = "osediff-weights"
FAMILY_FORMAT_VERSION = 1
_META = "fidesr."
_LORA_KEY = re.compile(r"\.lora_[AB]\.(?P<adapter>[^.]+)\.weight$")
_PARTS = ("encoder", "decoder", "others")
_UNET_LORA, _CONV_IN, _VAE_LORA = "unet_lora.", "unet_conv_in.", "vae_lora."


@dataclass(frozen=True)
class _SetLayout:
    """Where one LoRA set lives in both file formats."""

    label: str  # for messages
    rank_key: str  # pkl key, and metadata name after the fidesr. prefix
    alpha_key: str  # metadata name after the fidesr. prefix
    list_keys: dict[str, str]  # adapter -> pkl key of its module list
    prefix: str  # safetensors tensor-name prefix


_PIXEL = _SetLayout(
    "the pixel LoRA set",
    "lora_rank_unet_pix",
    "lora_alpha_pix",
    {a: f"unet_lora_{p}_modules_pix" for a, p in zip(PISA_SR_PIXEL_ADAPTERS, _PARTS, strict=True)},
    _UNET_LORA,
)
_SEMANTIC = _SetLayout(
    "the semantic LoRA set",
    "lora_rank_unet_sem",
    "lora_alpha_sem",
    {a: f"unet_lora_{p}_modules_sem" for a, p in zip(PISA_SR_SEMANTIC_ADAPTERS, _PARTS, strict=True)},
    _UNET_LORA,
)
_OSEDIFF_UNET = _SetLayout(
    "the U-Net LoRA",
    "rank_unet",
    "lora_alpha_unet",
    {a: f"unet_lora_{p}_modules" for a, p in zip(OSEDIFF_UNET_ADAPTERS, _PARTS, strict=True)},
    _UNET_LORA,
)
_OSEDIFF_VAE = _SetLayout(
    "the VAE encoder LoRA", "rank_vae", "lora_alpha_vae", {OSEDIFF_VAE_ADAPTER: "vae_lora_encoder_modules"}, _VAE_LORA
)
_PISA_KEYS = (*_PIXEL.list_keys.values(), *_SEMANTIC.list_keys.values(), "lora_rank_unet_pix", "lora_rank_unet_sem")
_PISA_KEYS += ("state_dict_unet",)
_OSEDIFF_KEYS = (*_OSEDIFF_UNET.list_keys.values(), "rank_unet", "rank_vae", "vae_lora_encoder_modules")
_OSEDIFF_KEYS += ("state_dict_unet", "state_dict_vae")
_OSEDIFF_VAE_KEYS = ("rank_vae", "vae_lora_encoder_modules", "state_dict_vae")
_EXPECTED = "restorer weights: FiDeSR (fidesr.pkl), PiSA-SR (pisa_sr.pkl), OSEDiff (osediff.pkl) or their .safetensors"


# --------------------------------------------------------------------------- telling the family


_FAMILY_OF = {ModelFamily.PISA_SR_WEIGHTS: "pisa-sr", ModelFamily.OSEDIFF_WEIGHTS: "osediff"}


def _family_by_rules(opened: OpenedCheckpoint) -> str | None:
    """ "pisa-sr" or "osediff" when the shared file rules (``file_rules``) say so; None otherwise."""
    return _FAMILY_OF.get(identify_checkpoint(opened).family)


# --------------------------------------------------------------------------- reading pkl


def _owned(state: object) -> object:
    """Fresh copies of memory-mapped tensors (they must not stay backed by the file)."""
    if not isinstance(state, dict):
        return state
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def _adapter_of(key: object) -> str | None:
    match = _LORA_KEY.search(key) if isinstance(key, str) else None
    return match["adapter"] if match else None


def _lora_set(loaded: dict, layout: _SetLayout, state: dict) -> LoraSet:
    adapters = set(layout.list_keys)
    return LoraSet(
        rank=loaded[layout.rank_key],
        target_modules={adapter: _as_list(loaded[key]) for adapter, key in layout.list_keys.items()},
        state={key: value for key, value in state.items() if _adapter_of(key) in adapters},
    )


def _check_pkl_keys(path: Path, keys: set[str], family: str, expected: tuple[str, ...], sets: dict) -> None:
    missing, unexpected = [k for k in expected if k not in keys], sorted(keys - set(expected))
    for what, set_keys in sets.items():
        absent = [key for key in set_keys if key in missing]
        if absent and len(absent) == len(missing) and not unexpected:
            parts = " and ".join(part.replace("its ", "the ") for part in sets)
            raise WeightsFileError(
                f"{path} holds {FAMILY_NAMES[family]} weights without {what} (no {', '.join(absent)}); "
                f"a complete {FAMILY_NAMES[family]} file holds {parts}"
            )
    if missing or unexpected:
        raise WeightsFileError(
            f"{path} is not a complete {FAMILY_NAMES[family]} weights file: expected the keys {list(expected)}; "
            f"missing {missing or 'none'}, unexpected {unexpected[:5] or 'none'}"
        )


def _stray_problem(state: object, allowed: set[str], what: str) -> str | None:
    if not isinstance(state, dict):
        return f"{what} is a {type(state).__name__}, expected a dict of tensors"
    stray = sorted(key for key in state if _adapter_of(key) not in allowed)
    return f"{what} holds {stray[0]!r}, which belongs to none of the adapters {sorted(allowed)}" if stray else None


def _read_pisa_sr_pkl(path: Path, loaded: dict) -> PiSASRWeights:
    keys = {str(key) for key in loaded}
    sets = {
        "its pixel LoRA set": [_PIXEL.rank_key, *_PIXEL.list_keys.values()],
        "its semantic LoRA set": [_SEMANTIC.rank_key, *_SEMANTIC.list_keys.values()],
    }
    _check_pkl_keys(path, keys, "pisa-sr", _PISA_KEYS, sets)
    state = _owned(loaded["state_dict_unet"])
    if problem := _stray_problem(state, {*PISA_SR_PIXEL_ADAPTERS, *PISA_SR_SEMANTIC_ADAPTERS}, "state_dict_unet"):
        raise WeightsFileError(f"{path}: {problem}")
    return PiSASRWeights(
        pixel=_lora_set(loaded, _PIXEL, state), semantic=_lora_set(loaded, _SEMANTIC, state), file_format="pkl"
    )


def _split_conv_in(state: dict) -> tuple[dict, dict]:
    """(LoRA tensors, conv_in ``weight``/``bias``) of OSEDiff's ``state_dict_unet``."""
    lora, conv_in = {}, {}
    for key, value in state.items():
        name = key.removeprefix("conv_in.base_layer.") if key.startswith("conv_in.base_layer.") else None
        if name is None and key in ("conv_in.weight", "conv_in.bias"):
            name = key.removeprefix("conv_in.")
        if name is not None:
            conv_in[name] = value
        else:
            lora[key] = value
    return lora, conv_in


def _read_osediff_pkl(path: Path, loaded: dict) -> OSEDiffWeights:
    keys = {str(key) for key in loaded}
    sets = {"its VAE encoder LoRA": list(_OSEDIFF_VAE_KEYS), "its U-Net LoRA": [*_OSEDIFF_UNET.list_keys.values()]}
    _check_pkl_keys(path, keys, "osediff", _OSEDIFF_KEYS, sets)
    unet_state, vae_state = _owned(loaded["state_dict_unet"]), _owned(loaded["state_dict_vae"])
    if not isinstance(unet_state, dict):
        raise WeightsFileError(f"{path}: state_dict_unet is a {type(unet_state).__name__}, expected a dict of tensors")
    lora, conv_in = _split_conv_in(unet_state)
    problem = _stray_problem(lora, set(OSEDIFF_UNET_ADAPTERS), "state_dict_unet") or _stray_problem(
        vae_state, {OSEDIFF_VAE_ADAPTER}, "state_dict_vae"
    )
    if problem:
        raise WeightsFileError(f"{path}: {problem}")
    return OSEDiffWeights(
        unet_lora=_lora_set(loaded, _OSEDIFF_UNET, lora),
        conv_in_state=conv_in,
        vae_lora=_lora_set(loaded, _OSEDIFF_VAE, vae_state),
        file_format="pkl",
    )


# --------------------------------------------------------------------------- reading safetensors


def _read_family_safetensors(path: Path, marker: str) -> PiSASRWeights | OSEDiffWeights:
    family = "pisa-sr" if marker == PISA_SR_FORMAT_MARKER else "osediff"
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    except safetensors.SafetensorError as error:
        raise WeightsFileError(f"{path} is a truncated or damaged safetensors file ({error})") from None
    if (version := metadata.get(_META + "format_version")) != str(FAMILY_FORMAT_VERSION):
        raise WeightsFileError(
            f"{path} is {FAMILY_NAMES[family]} safetensors format version {version!r}; "
            f"this package reads version {FAMILY_FORMAT_VERSION}"
        )
    layouts = (_PIXEL, _SEMANTIC) if family == "pisa-sr" else (_OSEDIFF_UNET, _OSEDIFF_VAE)
    sets = [_lora_set_from_metadata(path, metadata, tensors, layout) for layout in layouts]
    prefixes = (_UNET_LORA, _VAE_LORA, _CONV_IN) if family == "osediff" else (_UNET_LORA,)
    if stray := sorted(name for name in tensors if not name.startswith(prefixes)):
        raise WeightsFileError(f"{path} holds tensor {stray[0]!r}; expected only names starting with {prefixes}")
    free = {k: v for k, v in metadata.items() if not k.startswith(_META)}
    if family == "pisa-sr":
        return PiSASRWeights(pixel=sets[0], semantic=sets[1], metadata=free, file_format="safetensors")
    conv_in = {k.removeprefix(_CONV_IN): v for k, v in tensors.items() if k.startswith(_CONV_IN)}
    return OSEDiffWeights(sets[0], conv_in, sets[1], metadata=free, file_format="safetensors")


def _lora_set_from_metadata(path: Path, metadata: dict, tensors: dict, layout: _SetLayout) -> LoraSet:
    needed = [_META + key for key in (layout.rank_key, *layout.list_keys.values())]
    if absent := [key for key in needed if key not in metadata]:
        raise WeightsFileError(f"{path}: the safetensors metadata of {layout.label} lacks {absent}")
    try:
        rank = int(metadata[_META + layout.rank_key])
        alpha = float(metadata.get(_META + layout.alpha_key, RELEASED_LORA_ALPHA))
        lists = {adapter: json.loads(metadata[_META + key]) for adapter, key in layout.list_keys.items()}
    except (ValueError, json.JSONDecodeError) as error:
        raise WeightsFileError(f"{path}: the safetensors metadata of {layout.label} is malformed ({error})") from None
    state = {
        name.removeprefix(layout.prefix): value
        for name, value in tensors.items()
        if name.startswith(layout.prefix) and _adapter_of(name) in layout.list_keys
    }
    return LoraSet(rank=rank, target_modules=lists, state=state, alpha=alpha)


# --------------------------------------------------------------------------- the entry point


def _validate(weights: RestorerWeights, source: str) -> None:
    if isinstance(weights, PiSASRWeights):
        validate_pisa_sr_weights(weights, source=source)
    elif isinstance(weights, OSEDiffWeights):
        validate_osediff_weights(weights, source=source)


def _read_family_file(path: Path) -> PiSASRWeights | OSEDiffWeights | None:
    """The PiSA-SR or OSEDiff weights in ``path``; None when it is neither (or unreadable)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    container = container_by_content(path)
    if container is Container.PICKLE:
        loaded = load_tensors_only(path, mmap=True, error=WeightsFileError, expected=_EXPECTED)
        if not isinstance(loaded, dict):
            return None
        shapes = {key: tuple(value.shape) for key, value in state_dict_tensors(loaded).items()}
        family = _family_by_rules(OpenedCheckpoint(path, container, shapes, top_keys=frozenset(map(str, loaded))))
        if family == "pisa-sr":
            return _read_pisa_sr_pkl(path, loaded)
        return _read_osediff_pkl(path, loaded) if family == "osediff" else None
    if container is Container.SAFETENSORS:
        try:
            shapes, metadata = read_safetensors_header(path)
        except ModelFileError:
            return None  # the FiDeSR reader explains what is wrong with the file
        marker = metadata.get(_META + "format")
        # Only our own .safetensors hold these families; others are explained by the FiDeSR reader.
        if marker in (PISA_SR_FORMAT_MARKER, OSEDIFF_FORMAT_MARKER) and _family_by_rules(
            OpenedCheckpoint(path, container, shapes, metadata=metadata)
        ):
            return _read_family_safetensors(path, marker)
    return None


def load_restorer_weights(path: str | os.PathLike) -> RestorerWeights:
    """FiDeSR, PiSA-SR or OSEDiff weights from a .pkl or our .safetensors, told apart by content.

    Tensors are on the CPU in their stored dtype.  Raises ``WeightsFileError`` naming the file and
    what is missing or wrong; a file of no known family gets the FiDeSR reader's explanation.
    """
    path = Path(path).expanduser()
    weights = _read_family_file(path)
    if weights is None:
        return load_fidesr_weights(path)  # FiDeSR weights, or that reader's account of what the file is
    _validate(weights, str(path))
    return weights


# --------------------------------------------------------------------------- writing


def _set_payload(lora_set: LoraSet, layout: _SetLayout, path: Path) -> dict[str, object]:
    if lora_set.alpha != RELEASED_LORA_ALPHA:
        raise SettingsError(
            f"{path}: the authors' .pkl layout has no LoRA alpha (their code always uses {RELEASED_LORA_ALPHA}), "
            f"but {layout.label} uses {lora_set.alpha}; save it as .safetensors"
        )
    payload: dict[str, object] = {key: list(lora_set.target_modules[a]) for a, key in layout.list_keys.items()}
    payload[layout.rank_key] = int(lora_set.rank)
    return payload


def _pkl_payload(weights: PiSASRWeights | OSEDiffWeights, path: Path) -> dict[str, object]:
    if isinstance(weights, PiSASRWeights):
        payload = _set_payload(weights.pixel, _PIXEL, path) | _set_payload(weights.semantic, _SEMANTIC, path)
        payload["state_dict_unet"] = {
            k: compact_cpu_copy(v) for k, v in (weights.pixel.state | weights.semantic.state).items()
        }
        return payload
    payload = _set_payload(weights.unet_lora, _OSEDIFF_UNET, path) | _set_payload(weights.vae_lora, _OSEDIFF_VAE, path)
    # peft wraps conv_in when it carries a LoRA, and the released trainer saves the wrapper's names.
    wrapped = "conv_in" in weights.unet_lora.target_modules.get("default_encoder", [])
    conv_in_prefix = "conv_in.base_layer." if wrapped else "conv_in."
    unet_state = {k: compact_cpu_copy(v) for k, v in weights.unet_lora.state.items()}
    unet_state |= {conv_in_prefix + k: compact_cpu_copy(v) for k, v in weights.conv_in_state.items()}
    payload["state_dict_unet"] = unet_state
    payload["state_dict_vae"] = {k: compact_cpu_copy(v) for k, v in weights.vae_lora.state.items()}
    return payload


def _safetensors_payload(weights: PiSASRWeights | OSEDiffWeights, path: Path) -> tuple[dict, dict[str, str]]:
    reserved = sorted(key for key in weights.metadata if not isinstance(key, str) or key.startswith(_META))
    if reserved:
        raise SettingsError(f"{path}: metadata key {reserved[0]!r} is reserved for the file format ({_META}*)")
    metadata = {str(key): str(value) for key, value in weights.metadata.items()}
    pisa = isinstance(weights, PiSASRWeights)
    metadata[_META + "format"] = PISA_SR_FORMAT_MARKER if pisa else OSEDIFF_FORMAT_MARKER
    metadata[_META + "format_version"] = str(FAMILY_FORMAT_VERSION)
    pairs = (
        ((weights.pixel, _PIXEL), (weights.semantic, _SEMANTIC))
        if pisa
        else ((weights.unet_lora, _OSEDIFF_UNET), (weights.vae_lora, _OSEDIFF_VAE))
    )
    tensors: dict[str, torch.Tensor] = {}
    for lora_set, layout in pairs:
        metadata[_META + layout.rank_key] = str(lora_set.rank)
        metadata[_META + layout.alpha_key] = repr(float(lora_set.alpha))
        for adapter, key in layout.list_keys.items():
            metadata[_META + key] = json.dumps(list(lora_set.target_modules[adapter]))
        tensors |= {layout.prefix + k: compact_cpu_copy(v) for k, v in lora_set.state.items()}
    if not pisa:
        tensors |= {_CONV_IN + k: compact_cpu_copy(v) for k, v in weights.conv_in_state.items()}
    return tensors, metadata


def save_restorer_weights(
    weights: RestorerWeights, path: str | os.PathLike, *, file_format: Literal["safetensors", "pkl"] | None = None
) -> None:
    """Write weights of any family atomically; the format follows the extension unless ``file_format`` is given.

    A ``.pkl`` is exactly the authors' layout of that family (metadata dropped); invalid weights are refused.
    """
    if isinstance(weights, FiDeSRWeights):
        save_fidesr_weights(weights, path, file_format=file_format)
        return
    path = Path(path).expanduser()
    chosen = file_format or weights_format_of(path)
    _validate(weights, f"weights to be written to {path}")
    write_weights_file(path, chosen, lambda: _pkl_payload(weights, path), lambda: _safetensors_payload(weights, path))


def convert_restorer_weights(source: str | os.PathLike, destination: str | os.PathLike) -> RestorerWeights:
    """Read ``source`` (any family) and write it to ``destination`` in the format of its extension."""
    destination = Path(destination).expanduser()
    destination_format = weights_format_of(destination)
    weights = load_restorer_weights(source)
    if destination_format == "safetensors":
        weights.metadata.setdefault("converted_from", Path(source).name)
    save_restorer_weights(weights, destination, file_format=destination_format)
    return weights
