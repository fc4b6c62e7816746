"""The weights of the three families: read and checked in ``weights_reading``, written and described here,
over the layout table (docs/algorithm.md §6).  A ``.pkl`` gets exactly the authors' keys, so their scripts
load ours; every write is atomic and refuses invalid weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch

from ..atomic_write import write_atomic
from ..errors import SettingsError
from ..networks.families import FAMILY_NAMES, RestorerWeights
from ..networks.lora import RELEASED_LORA_ALPHA
from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from .layouts import FORMAT_VERSION, LAYOUTS, META, Layout
from .weights_reading import load_restorer_weights, validate_weights


def _format_of(path: Path) -> Literal["pkl", "safetensors"]:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES or suffix in SAFETENSORS_SUFFIXES:
        return "pkl" if suffix in PICKLE_SUFFIXES else "safetensors"
    raise SettingsError(
        f"{path}: cannot tell the weights format from the extension {suffix or '(none)'!r}; use .pkl or .safetensors"
    )


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A compact CPU copy in the same dtype (views of larger storages would be written whole)."""
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _pkl_payload(weights: RestorerWeights, layout: Layout, path: Path) -> dict[str, object]:
    payload: dict[str, object] = {}
    for s in layout.sets:
        lora = weights.lora[s.part]
        if lora.alpha != RELEASED_LORA_ALPHA:
            raise SettingsError(
                f"{path}: the authors' .pkl layout has no LoRA alpha (their code always uses {RELEASED_LORA_ALPHA}), "
                f"but the {s.label} uses {lora.alpha}; save it as .safetensors"
            )
        payload |= {key: list(lora.target_modules[a]) for a, key in s.lists.items()}
        payload[s.rank_key] = int(lora.rank)
    for s in layout.sets:
        state = payload.setdefault(s.state_key, {})
        state.update({k: _compact(v) for k, v in weights.lora[s.part].state.items()})
    if weights.conv_in_state:  # under peft's wrapper name when conv_in carries a LoRA, as the released trainer saves
        wrapped = "conv_in" in weights.lora["unet"].target_modules.get("default_encoder", [])
        prefix = "conv_in.base_layer." if wrapped else "conv_in."
        payload["state_dict_unet"] |= {prefix + k: _compact(v) for k, v in weights.conv_in_state.items()}
    if "lrrb_state" in layout.extras:
        payload["lrrb_state_dict"] = {k: _compact(v) for k, v in weights.lrrb_state.items()}
    return payload


def _safetensors_payload(weights: RestorerWeights, layout: Layout, path: Path) -> tuple[dict, dict[str, str]]:
    if reserved := sorted(key for key in weights.metadata if not isinstance(key, str) or key.startswith(META)):
        raise SettingsError(f"{path}: metadata key {reserved[0]!r} is reserved for the file format ({META}*)")
    metadata = {str(key): str(value) for key, value in weights.metadata.items()}
    metadata |= {META + "format": layout.marker, META + "format_version": str(FORMAT_VERSION)}
    tensors: dict[str, torch.Tensor] = {}
    for s in layout.sets:
        lora = weights.lora[s.part]
        metadata |= {META + s.meta_rank: str(lora.rank), META + s.meta_alpha: repr(float(lora.alpha))}
        metadata |= {META + key: json.dumps(list(lora.target_modules[a])) for a, key in s.lists.items()}
        tensors |= {s.prefix + k: _compact(v) for k, v in lora.state.items()}
    for attribute, (_, _, prefix) in layout.extras.items():
        tensors |= {prefix + k: _compact(v) for k, v in getattr(weights, attribute).items()}
    return tensors, metadata


def save_restorer_weights(
    weights: RestorerWeights, path: str | os.PathLike, *, file_format: Literal["safetensors", "pkl"] | None = None
) -> None:
    """Write ``weights`` atomically; the format follows the extension (.pkl/.pt/.pth/.ckpt/.bin or .safetensors)
    unless ``file_format`` is given.  A ``.pkl`` is exactly the authors' layout (metadata dropped); invalid
    weights are refused."""
    path = Path(path).expanduser()
    chosen = file_format or _format_of(path)
    if chosen not in ("pkl", "safetensors"):
        raise SettingsError(f"weights file format {chosen!r} is not one of 'pkl', 'safetensors'")
    validate_weights(weights, source=f"weights to be written to {path}")
    layout = LAYOUTS[weights.family]
    if chosen == "pkl":
        payload = _pkl_payload(weights, layout, path)
        write_atomic(path, lambda temp: torch.save(payload, temp))
    else:
        tensors, metadata = _safetensors_payload(weights, layout, path)
        write_atomic(path, lambda temp: safetensors.torch.save_file(tensors, temp, metadata=metadata))


def convert_restorer_weights(source: str | os.PathLike, destination: str | os.PathLike) -> RestorerWeights:
    """Read ``source`` and write it to ``destination`` in the format of its extension; returns what was read.

    Going to safetensors records ``converted_from`` (the source file name) unless metadata already has it.
    """
    destination = Path(destination).expanduser()
    destination_format = _format_of(destination)
    weights = load_restorer_weights(source)
    if destination_format == "safetensors":
        weights.metadata.setdefault("converted_from", Path(source).name)
    save_restorer_weights(weights, destination, file_format=destination_format)
    return weights


def describe_restorer_weights(weights: RestorerWeights) -> dict[str, object]:
    """A summary for ``fidesr info`` and ``doctor``: family, format, each LoRA set's rank and size, the
    parameters of the other parts, dtypes and metadata."""
    layout = LAYOUTS[weights.family]
    formats = {"pkl": "pkl (the authors' torch.save layout)", "safetensors": f"safetensors ({layout.marker} v1)"}
    summary: dict[str, object] = {
        "family": FAMILY_NAMES[weights.family],
        "format": formats.get(weights.file_format, "in memory"),
    }
    tensors = []
    for part, lora in weights.lora.items():
        summary[f"{part}_lora"] = {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "modules": {adapter: len(set(modules)) for adapter, modules in lora.target_modules.items()},
            "parameters": sum(tensor.numel() for tensor in lora.state.values()),
        }
        tensors += lora.state.values()
    for attribute in layout.extras:
        state = getattr(weights, attribute)
        summary[attribute.replace("_state", "_parameters")] = sum(tensor.numel() for tensor in state.values())
        tensors += state.values()
    summary["dtypes"] = ", ".join(sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors}))
    summary["metadata"] = dict(weights.metadata)
    return summary
