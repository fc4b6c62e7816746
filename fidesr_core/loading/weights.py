"""FiDeSR weights (the three U-Net LoRA adapters and the LRRB) and the two files that hold them.

``pkl``: the authors' ``fidesr.pkl`` (docs/algorithm.md §6), a ``torch.save`` dict with exactly the keys
``unet_lora_encoder_modules``, ``unet_lora_decoder_modules``, ``unet_lora_others_modules``
(lists of U-Net module names), ``lora_rank_unet`` (int), ``state_dict_unet`` (peft names,
``<module>.lora_A.<adapter>.weight`` and ``lora_B``) and ``lrrb_state_dict``.  Read only with
``torch.load(weights_only=True)``; written in the same layout so the authors' scripts load our
files.  The layout has no place for metadata: writing a ``.pkl`` drops it.

``safetensors``: our format, version 1.

- tensors ``unet_lora.<peft name>`` (``unet_lora.down_blocks.0.attentions.0.proj_in.lora_A.default_encoder.weight``)
  and ``lrrb.<LRRB state name>`` (``lrrb.db1.conv1.weight``), each in the dtype it came in (fp32, fp16, bf16);
- string metadata ``fidesr.format`` = ``"fidesr-weights"`` (the marker: files without it are refused),
  ``fidesr.format_version`` = ``"1"``, ``fidesr.lora_rank`` (e.g. ``"8"``), and
  ``fidesr.unet_lora_encoder_modules`` / ``fidesr.unet_lora_decoder_modules`` / ``fidesr.unet_lora_others_modules``
  (JSON lists of module names).  Every other key is free-form metadata (``source``, ``training_step`` ...)
  and comes back in ``FiDeSRWeights.metadata``; ``fidesr.*`` keys are reserved.  The prefix keeps clear of the
  bare ``format`` key other writers use (``"pt"``).

The format is told by content (the safetensors layout, else zip or pickle magic), not by the extension.
Weights are checked on reading and before writing by ``validate_fidesr_weights`` (``weights_validation``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch

from ..errors import ModelFileError, SettingsError, WeightsFileError
from ..networks.lora import ADAPTER_NAMES, RELEASED_LORA_ALPHA
from ..networks.model import FiDeSRWeights
from .checkpoint_files import (
    Container,
    OpenedCheckpoint,
    container_by_content,
    read_safetensors_header,
    read_safetensors_tensors,
    state_dict_tensors,
)
from .file_rules import ModelFamily
from .identify import identify_checkpoint, identify_model_file
from .safe_torch_load import load_tensors_only
from .weights_validation import validate_fidesr_weights
from .weights_writing import compact_cpu_copy, weights_format_of, write_weights_file

__all__ = [
    "SAFETENSORS_FORMAT_MARKER",
    "SAFETENSORS_FORMAT_VERSION",
    "load_fidesr_weights",
    "save_fidesr_weights",
    "convert_fidesr_weights",
    "describe_fidesr_weights",
]


SAFETENSORS_FORMAT_MARKER = "fidesr-weights"
SAFETENSORS_FORMAT_VERSION = 1
_META = "fidesr."  # reserved metadata prefix
_LORA_PREFIX, _LRRB_PREFIX = "unet_lora.", "lrrb."
# The authors' dict keys, in their order; module lists follow ADAPTER_NAMES.
_MODULE_LIST_KEYS = ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")
_LIST_KEY_OF = dict(zip(ADAPTER_NAMES, _MODULE_LIST_KEYS, strict=True))  # adapter -> the authors' list key
_PKL_KEYS = (*_MODULE_LIST_KEYS, "lora_rank_unet", "state_dict_unet", "lrrb_state_dict")
_EXPECTED = "FiDeSR weights (fidesr.pkl from the authors, or a fidesr.safetensors written by this package)"


# --------------------------------------------------------------------------- telling files apart


def _sniff_format(path: Path) -> Literal["pkl", "safetensors"]:
    container = container_by_content(path)
    if container is not None:
        return "pkl" if container is Container.PICKLE else "safetensors"
    with open(path, "rb") as handle:
        head = handle.read(9)
    raise WeightsFileError(
        f"{path} is neither a PyTorch pickle/zip file nor a safetensors file (it starts with {head!r}); "
        f"expected {_EXPECTED}"
    )


def _base_model_refusal(path: Path, description: str) -> str:
    return (
        f"{path} is a base model ({description}), not FiDeSR weights: it belongs in the base model input "
        f"(base_model / --base); the weights input takes {_EXPECTED}"
    )


def _foreign_checkpoint(path: Path, opened: OpenedCheckpoint) -> str | None:
    """Why a file that is not FiDeSR weights was refused, when ``file_rules`` recognises it."""
    identity = identify_checkpoint(opened)
    family, evidence = identity.family, ", ".join(identity.evidence)
    if family is ModelFamily.PISA_SR_WEIGHTS:
        return (
            f"{path} is a PiSA-SR checkpoint (pixel/semantic LoRA: {evidence}), not FiDeSR weights; "
            "PiSA-SR weights are not supported by this loader (load_fidesr_weights): load_restorer_weights reads "
            "all three families"
        )
    if family is ModelFamily.OSEDIFF_WEIGHTS:
        return (
            f"{path} is an OSEDiff checkpoint ({evidence}), not FiDeSR weights; "
            "OSEDiff weights are not supported by this loader (load_fidesr_weights): load_restorer_weights reads "
            "all three families"
        )
    if identity.is_sd2 or family.is_base_model:
        return _base_model_refusal(path, identity.description)
    if family not in (ModelFamily.UNKNOWN, ModelFamily.FIDESR_WEIGHTS):
        return f"{path} is {identity.description}, not FiDeSR weights; expected {_EXPECTED}"
    return None


# --------------------------------------------------------------------------- reading


def _owned(value: object) -> object:
    """A copy in fresh memory: memory-mapped tensors must not stay backed by the file."""
    return value.clone() if isinstance(value, torch.Tensor) else value


def _read_pkl(path: Path) -> FiDeSRWeights:
    loaded = load_tensors_only(path, mmap=True, error=WeightsFileError, expected=_EXPECTED)
    if not isinstance(loaded, dict):
        raise WeightsFileError(
            f"{path} holds a {type(loaded).__name__}; expected the FiDeSR dict with keys {list(_PKL_KEYS)}"
        )
    keys = {str(key) for key in loaded}
    if keys != set(_PKL_KEYS):
        tensors = state_dict_tensors(loaded)  # Lightning-style nesting unwrapped, as base checkpoints have
        opened = OpenedCheckpoint(
            path, Container.PICKLE, {k: tuple(v.shape) for k, v in tensors.items()}, top_keys=frozenset(keys)
        )
        if message := _foreign_checkpoint(path, opened):
            raise WeightsFileError(message)
        missing, unexpected = [k for k in _PKL_KEYS if k not in keys], sorted(keys - set(_PKL_KEYS))
        if missing == ["lrrb_state_dict"] and not unexpected:
            raise WeightsFileError(
                f"{path} has no LRRB (no lrrb_state_dict); FiDeSR weights hold the LoRA and the LRRB"
            )
        raise WeightsFileError(
            f"{path} is not a FiDeSR weights file: expected exactly the keys {list(_PKL_KEYS)}; "
            f"missing {missing or 'none'}, unexpected {unexpected[:5] or 'none'}"
        )
    lists = {adapter: loaded[key] for adapter, key in _LIST_KEY_OF.items()}
    lora, lrrb = loaded["state_dict_unet"], loaded["lrrb_state_dict"]
    return FiDeSRWeights(
        lora_rank=loaded["lora_rank_unet"],
        target_modules={a: list(m) if isinstance(m, (list, tuple)) else m for a, m in lists.items()},
        unet_lora_state={k: _owned(v) for k, v in lora.items()} if isinstance(lora, dict) else lora,
        lrrb_state={k: _owned(v) for k, v in lrrb.items()} if isinstance(lrrb, dict) else lrrb,
        file_format="pkl",
    )


def _read_safetensors(path: Path) -> FiDeSRWeights:
    try:
        shapes, metadata = read_safetensors_header(path)
        if metadata.get(_META + "format") != SAFETENSORS_FORMAT_MARKER:
            opened = OpenedCheckpoint(path, Container.SAFETENSORS, shapes, metadata=metadata)
            raise WeightsFileError(
                _foreign_checkpoint(path, opened)
                or f"{path} is a safetensors file without the FiDeSR format marker (its metadata has no "
                f"{_META}format = {SAFETENSORS_FORMAT_MARKER!r}); expected {_EXPECTED}"
            )
        names = list(shapes)
        tensors = read_safetensors_tensors(path, names)
    except WeightsFileError:
        raise
    except ModelFileError as error:
        raise WeightsFileError(f"{error}; expected {_EXPECTED}") from None
    absent = [_META + key for key in ("format_version", "lora_rank", *_MODULE_LIST_KEYS) if _META + key not in metadata]
    if absent:
        raise WeightsFileError(f"{path}: the FiDeSR safetensors metadata lacks {absent} (damaged or hand-edited file)")
    if (version := metadata[_META + "format_version"]) != str(SAFETENSORS_FORMAT_VERSION):
        raise WeightsFileError(
            f"{path} is FiDeSR safetensors format version {version!r}; this package reads version {SAFETENSORS_FORMAT_VERSION}"
        )
    try:
        rank = int(metadata[_META + "lora_rank"])
        alpha = float(metadata.get(_META + "lora_alpha", RELEASED_LORA_ALPHA))
        lists = {adapter: json.loads(metadata[_META + key]) for adapter, key in _LIST_KEY_OF.items()}
    except (ValueError, json.JSONDecodeError) as error:
        raise WeightsFileError(f"{path}: FiDeSR safetensors metadata is malformed ({error})") from None
    stray = [name for name in names if not name.startswith((_LORA_PREFIX, _LRRB_PREFIX))]
    if stray:
        raise WeightsFileError(
            f"{path} holds tensor {stray[0]!r}; expected only names starting with {_LORA_PREFIX!r} or {_LRRB_PREFIX!r}"
        )
    return FiDeSRWeights(
        lora_rank=rank,
        target_modules=lists,
        unet_lora_state={k.removeprefix(_LORA_PREFIX): v for k, v in tensors.items() if k.startswith(_LORA_PREFIX)},
        lrrb_state={k.removeprefix(_LRRB_PREFIX): v for k, v in tensors.items() if k.startswith(_LRRB_PREFIX)},
        metadata={k: v for k, v in metadata.items() if not k.startswith(_META)},
        file_format="safetensors",
        lora_alpha=alpha,
    )


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise WeightsFileError(f"{path} does not exist; expected {_EXPECTED}")
    if path.is_dir():
        try:
            identity = identify_model_file(path)  # reads JSON configs only
        except ModelFileError:
            identity = None
        if identity is not None and identity.family is not ModelFamily.UNKNOWN:
            raise WeightsFileError(_base_model_refusal(path, identity.description))
        raise WeightsFileError(f"{path} is a folder; expected a file with {_EXPECTED}")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{path} is empty (0 bytes): an incomplete download or copy? Expected {_EXPECTED}")


def load_fidesr_weights(path: str | os.PathLike) -> FiDeSRWeights:
    """Read the authors' ``fidesr.pkl`` (unchanged) or our ``.safetensors``; the format is told by content.

    Tensors keep their stored dtype and end up on the CPU.  Raises ``WeightsFileError``
    naming the file and what was expected.
    """
    path = Path(path).expanduser()
    _check_readable(path)
    weights = _read_pkl(path) if _sniff_format(path) == "pkl" else _read_safetensors(path)
    validate_fidesr_weights(weights, source=str(path))
    return weights


# --------------------------------------------------------------------------- writing


def _pkl_payload(weights: FiDeSRWeights, path: Path) -> dict[str, object]:
    if weights.lora_alpha != RELEASED_LORA_ALPHA:
        raise SettingsError(
            f"{path}: the authors' .pkl layout has no LoRA alpha (their code always uses {RELEASED_LORA_ALPHA}), "
            f"but these weights use {weights.lora_alpha}; save them as .safetensors"
        )
    payload: dict[str, object] = {key: list(weights.target_modules[a]) for a, key in _LIST_KEY_OF.items()}
    payload["lora_rank_unet"] = int(weights.lora_rank)
    payload["state_dict_unet"] = {key: compact_cpu_copy(value) for key, value in weights.unet_lora_state.items()}
    payload["lrrb_state_dict"] = {key: compact_cpu_copy(value) for key, value in weights.lrrb_state.items()}
    return payload


def _safetensors_payload(weights: FiDeSRWeights, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    reserved = sorted(key for key in weights.metadata if not isinstance(key, str) or key.startswith(_META))
    if reserved:
        raise SettingsError(f"{path}: metadata key {reserved[0]!r} is reserved for the file format ({_META}*)")
    tensors = {_LORA_PREFIX + key: compact_cpu_copy(value) for key, value in weights.unet_lora_state.items()}
    tensors |= {_LRRB_PREFIX + key: compact_cpu_copy(value) for key, value in weights.lrrb_state.items()}
    metadata = {str(key): str(value) for key, value in weights.metadata.items()}
    metadata[_META + "format"] = SAFETENSORS_FORMAT_MARKER
    metadata[_META + "format_version"] = str(SAFETENSORS_FORMAT_VERSION)
    metadata[_META + "lora_rank"] = str(weights.lora_rank)
    metadata[_META + "lora_alpha"] = repr(float(weights.lora_alpha))
    for adapter, key in _LIST_KEY_OF.items():
        metadata[_META + key] = json.dumps(list(weights.target_modules[adapter]))
    return tensors, metadata


def save_fidesr_weights(
    weights: FiDeSRWeights, path: str | os.PathLike, *, file_format: Literal["safetensors", "pkl"] | None = None
) -> None:
    """Write ``weights`` atomically (temp file in the same folder, then ``os.replace``).

    ``file_format`` defaults to the extension's (.pkl/.pt/.pth/.ckpt/.bin or .safetensors).
    A ``.pkl`` is exactly the authors' layout (metadata is dropped); invalid weights are refused.
    """
    path = Path(path).expanduser()
    chosen = file_format or weights_format_of(path)
    validate_fidesr_weights(weights, source=f"weights to be written to {path}")
    write_weights_file(path, chosen, lambda: _pkl_payload(weights, path), lambda: _safetensors_payload(weights, path))


def convert_fidesr_weights(source: str | os.PathLike, destination: str | os.PathLike) -> FiDeSRWeights:
    """Read ``source`` and write it to ``destination`` in the format of its extension; returns what was read.

    Going to safetensors records ``converted_from`` (the source file name) unless metadata already has it.
    """
    destination = Path(destination).expanduser()
    destination_format = weights_format_of(destination)
    weights = load_fidesr_weights(source)
    if destination_format == "safetensors":
        weights.metadata.setdefault("converted_from", Path(source).name)
    save_fidesr_weights(weights, destination, file_format=destination_format)
    return weights


# --------------------------------------------------------------------------- describing


def describe_fidesr_weights(weights: FiDeSRWeights) -> dict[str, object]:
    """A summary for ``fidesr info`` and ``doctor``: format, rank, modules per adapter, sizes, dtypes, metadata."""
    formats = {
        "pkl": "pkl (the authors' torch.save layout)",
        "safetensors": f"safetensors ({SAFETENSORS_FORMAT_MARKER} v{SAFETENSORS_FORMAT_VERSION})",
    }
    tensors = [*weights.unet_lora_state.values(), *weights.lrrb_state.values()]
    return {
        "format": formats.get(weights.file_format, "in memory"),
        "lora_rank": weights.lora_rank,
        "lora_alpha": weights.lora_alpha,
        "lora_modules": {adapter: len(weights.target_modules.get(adapter, [])) for adapter in ADAPTER_NAMES},
        "lora_parameters": sum(tensor.numel() for tensor in weights.unet_lora_state.values()),
        "lrrb_parameters": sum(tensor.numel() for tensor in weights.lrrb_state.values()),
        "dtypes": ", ".join(sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors})),
        "metadata": dict(weights.metadata),
    }
