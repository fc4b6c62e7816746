"""Writing weights files of any family: the format from the extension, compact tensors, one atomic write."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch

from ..atomic_write import write_atomic
from ..errors import SettingsError
from .checkpoint_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

__all__ = ["WeightsFormat", "weights_format_of", "compact_cpu_copy", "write_weights_file"]

WeightsFormat = Literal["pkl", "safetensors"]


def weights_format_of(path: Path) -> WeightsFormat:
    """The format a weights file named ``path`` is written in, from its extension."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return "pkl"
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    raise SettingsError(
        f"{path}: cannot tell the weights format from the extension {suffix or '(none)'!r}; use .pkl or .safetensors"
    )


def compact_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A compact CPU copy in the same dtype (views of larger storages would be written whole)."""
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def write_weights_file(
    path: Path,
    file_format: str,
    pkl_payload: Callable[[], dict[str, object]],
    safetensors_payload: Callable[[], tuple[dict[str, torch.Tensor], dict[str, str]]],
) -> None:
    """Write the payload of ``file_format`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    if file_format == "pkl":
        payload = pkl_payload()
        write_atomic(path, lambda temp: torch.save(payload, temp))
    elif file_format == "safetensors":
        tensors, metadata = safetensors_payload()
        write_atomic(path, lambda temp: safetensors.torch.save_file(tensors, temp, metadata=metadata))
    else:
        raise SettingsError(f"weights file format {file_format!r} is not one of 'pkl', 'safetensors'")
