"""Opening untrusted model files: pickles only through ``torch.load(weights_only=True)``, safetensors through its
library.  The container is told by content first, name second; every failure is one ``ModelFileError``."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import safetensors
import torch

from ..errors import ModelFileError

SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})
_ZIP_MAGIC = b"PK\x03\x04"  # a torch.save zip archive starts with this
_MAX_SNIFFED_HEADER = 100 * 2**20  # a longer JSON header is not parsed just to tell the container
_READ_ERRORS = (EOFError, OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError)


class Container(str, Enum):
    """How a model is stored."""

    SAFETENSORS = "safetensors"
    PICKLE = "ckpt (pickle)"
    DIFFUSERS_FOLDER = "diffusers folder"
    FOLDER = "folder"  # a folder that is not a diffusers folder

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Header:
    """What a single file holds, without its tensor data: key shapes (``state_dict`` nesting unwrapped),
    a pickled dict's top-level keys, safetensors metadata."""

    path: Path
    container: Container
    shapes: dict[str, tuple[int, ...]]
    top_keys: frozenset[str] = frozenset()
    metadata: dict[str, str] = field(default_factory=dict)


def load_pickle(path: Path, *, mmap: bool) -> object:
    """What ``torch.save`` wrote to ``path``, on the CPU, tensors and plain containers only; a zip archive is
    memory-mapped when ``mmap`` is set (cheap to inspect; legacy files cannot be mapped)."""
    # torch.load hands paths ending in .safetensors to safetensors: give it the open file then (no mmap).
    by_path = not str(path).endswith(".safetensors")
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices from the weights-only unpickler
            mapped = mmap and by_path and handle.read(4) == _ZIP_MAGIC
            handle.seek(0)
            return torch.load(path if by_path else handle, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as failure:
        refused = re.search(r"GLOBAL\s+([\w.]+)", str(failure))
        if refused:
            raise ModelFileError(
                f"{path} was refused: it contains code or Python objects that we refuse to load (it asks for "
                f"{refused.group(1)!r}); model files are read with torch.load(weights_only=True), which allows "
                "tensors and plain containers only, and nothing in the file was run. A .safetensors copy avoids this"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\n", f"{failure}\n")
        detail = reason.group(1).strip() if reason else "unreadable pickle"
        raise ModelFileError(
            f"{path} is not a readable PyTorch file ({detail}): damaged, or not written by torch.save"
        ) from None
    except _READ_ERRORS as failure:
        detail = re.split(r"(?<=\.)\s", str(failure).strip() or type(failure).__name__)[0][:160]  # first sentence
        raise ModelFileError(
            f"{path} is truncated or damaged: it cannot be read as a PyTorch file ({detail})"
        ) from None


def _safetensors_error(path: Path, error: Exception) -> ModelFileError:
    detail = str(error).removeprefix("Error while deserializing header: ")
    if "incomplete" in detail or "not fully covered" in detail:
        return ModelFileError(
            f"{path} is truncated: its header describes more bytes than the file has (incomplete download or copy?)"
        )
    return ModelFileError(f"{path} is not a valid safetensors file ({detail}): damaged, truncated or another format")


def _container(path: Path) -> Container:
    """The safetensors layout first (an 8-byte little-endian header length that fits the file, then a JSON
    object): its first byte may well be 0x80, the pickle marker, which is only believed when the layout fails."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
        length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
        layout = head[8:9] == b"{" and 2 <= length <= size - 8
        pickle_marker = head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"  # torch zip, or pickle protocol >= 2
        if layout and (not pickle_marker or length > _MAX_SNIFFED_HEADER):
            return Container.SAFETENSORS  # a damaged header is reported by the reader
        try:
            if layout and isinstance(json.loads(head[8:] + handle.read(length - 1)), dict):
                return Container.SAFETENSORS
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    if pickle_marker or path.suffix.lower() in PICKLE_SUFFIXES:
        return Container.PICKLE
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return Container.SAFETENSORS  # a damaged .safetensors file: the reader says what is wrong
    raise ModelFileError(
        f"{path} is not a model file this loader reads (expected .safetensors, or .ckpt/.pt/.pth/.bin/.pkl)"
    )


def read_header(path: Path) -> tuple[Header, dict | None]:
    """The header of a single file, and for a pickle the dict it holds (memory-mapped when it is a zip)."""
    if not path.exists():
        raise ModelFileError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes): an incomplete download or copy?")
    if _container(path) is Container.SAFETENSORS:
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                metadata = {str(key): str(value) for key, value in (handle.metadata() or {}).items()}
        except safetensors.SafetensorError as error:
            raise _safetensors_error(path, error) from None
        return Header(path, Container.SAFETENSORS, shapes, metadata=metadata), None
    loaded = load_pickle(path, mmap=True)
    if not isinstance(loaded, dict):
        raise ModelFileError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors: not a model checkpoint")
    shapes = {key: tuple(value.shape) for key, value in state_dict_tensors(loaded).items()}
    return Header(path, Container.PICKLE, shapes, top_keys=frozenset(map(str, loaded))), loaded


def read_tensors(path: Path, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors ``keys`` of a safetensors file, each cast to ``dtype`` (default: as stored), in memory of their own:
    the ``pread`` backend, as a mapped file would count twice in peak RSS (benchmarks/bench_loading.py)."""
    tensors = {}
    try:
        with safetensors.safe_open(str(path), framework="pt", backend="pread") as handle:
            for key in keys:
                tensor = handle.get_tensor(key)
                tensors[key] = tensor if dtype in (None, tensor.dtype) else tensor.to(dtype)
    except safetensors.SafetensorError as error:
        raise _safetensors_error(path, error) from None
    except OSError as error:
        raise ModelFileError(f"{path} cannot be read ({error.strerror or error})") from None
    return tensors


def state_dict_tensors(loaded: dict) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint dict under string keys, ``state_dict`` nesting unwrapped."""
    state = loaded
    while isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style {"state_dict": {...}, "global_step": ...}
    return {key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
