"""Opening single-file model checkpoints without trusting them.

Files are ``.safetensors`` (read with the safetensors library: the header first,
then tensors one by one, copied out of its memory map) or pickles (``.ckpt``/``.pt``/``.pth``/``.bin``/``.pkl``)
read only with ``torch.load(weights_only=True)``, memory-mapped when the file
is a zip archive.  What kind of file it is, is told by its content first and by
its name second.  Telling what a file *holds* lives in ``identify``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import safetensors
import torch

from ..errors import ModelFileError
from .safe_torch_load import ZIP_MAGIC, load_tensors_only

__all__ = [
    "SAFETENSORS_SUFFIXES",
    "PICKLE_SUFFIXES",
    "Container",
    "container_by_content",
    "OpenedCheckpoint",
    "open_checkpoint",
    "read_safetensors_header",
    "read_safetensors_tensors",
    "state_dict_tensors",
]

SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})
_MAX_SNIFFED_HEADER = 100 * 2**20  # a longer JSON header is not parsed just to tell the container
_MAPPED_BYTES_PER_OPEN = 256 * 2**20


class Container(str, Enum):
    """How a model is stored."""

    SAFETENSORS = "safetensors"
    PICKLE = "ckpt (pickle)"
    DIFFUSERS_FOLDER = "diffusers folder"
    FOLDER = "folder"  # a folder that is not a diffusers folder

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class OpenedCheckpoint:
    """A single-file checkpoint whose key names and shapes are known; tensors load on demand.

    safetensors: only the header has been read.  Pickles: the state dict is in
    ``tensors``, memory-mapped (``mapped``, cheap to inspect) or read into
    memory (handed over key by key by ``load``).
    """

    path: Path
    container: Container
    shapes: dict[str, tuple[int, ...]]
    top_keys: frozenset[str] = frozenset()  # keys of a pickled dict's top level (training outputs)
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] | None = None
    mapped: bool = False

    def load(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors for ``keys``, cast to ``dtype`` one at a time (no second full copy ever exists).

        Every returned tensor owns fresh, aligned memory.  A pickle read into
        memory hands its tensors over: each key can be loaded once.
        """
        if self.container is Container.SAFETENSORS:
            return read_safetensors_tensors(self.path, keys, dtype)
        if self.tensors is None:
            raise ModelFileError(f"{self.path}: its tensors were released already")
        if self.mapped:  # copies: weights must not stay backed by the file (rewriting it would crash us)
            return {key: self.tensors[key].to(dtype or self.tensors[key].dtype, copy=True) for key in keys}
        return {key: _cast(self.tensors.pop(key), dtype) for key in keys}

    def release(self) -> None:
        """Drop the pickled state dict (tensors already handed out stay valid)."""
        self.tensors = None


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


# --------------------------------------------------------------------------- safetensors (the library)


def _safetensors_problem(path: Path, error: Exception) -> ModelFileError:
    detail = str(error).removeprefix("Error while deserializing header: ")
    if "incomplete" in detail or "not fully covered" in detail:
        return ModelFileError(
            f"{path} is truncated: its header describes more bytes than the file has (incomplete download or copy?)"
        )
    return ModelFileError(f"{path} is not a valid safetensors file ({detail}): damaged, truncated or another format")


def _safe_open(path: Path) -> Any:
    return safetensors.safe_open(str(path), framework="pt")


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key shapes and ``__metadata__`` of a safetensors file, reading its header only.

    The library checks that the header is well formed and that the file is long
    enough for the tensors it describes (a truncated download fails here).
    """
    try:
        with _safe_open(path) as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except safetensors.SafetensorError as error:
        raise _safetensors_problem(path, error) from None
    except OSError as error:
        raise ModelFileError(f"{path} cannot be read ({error.strerror or error})") from None
    return shapes, {str(key): str(value) for key, value in metadata.items()}


def read_safetensors_tensors(
    path: Path, keys: Iterable[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of a safetensors file, each cast to ``dtype`` (default: as stored).

    Each tensor is copied out of the library's memory map into torch-allocated memory: 64-byte aligned, as
    CPU kernels expect (tensors in the map are not), and owned by the tensor alone.  The file is reopened
    every ``_MAPPED_BYTES_PER_OPEN``: closing the map gives back the pages read so far, so a checkpoint's
    pages never all count twice in the process's memory.
    """
    pending = list(keys)[::-1]
    loaded: dict[str, torch.Tensor] = {}
    try:
        while pending:
            mapped = 0
            with _safe_open(path) as handle:
                while pending and mapped < _MAPPED_BYTES_PER_OPEN:
                    key = pending.pop()
                    tensor = handle.get_tensor(key)
                    mapped += tensor.numel() * tensor.element_size()
                    loaded[key] = tensor.to(dtype or tensor.dtype, copy=True)
                    del tensor
    except safetensors.SafetensorError as error:
        raise _safetensors_problem(path, error) from None
    except OSError as error:
        raise ModelFileError(f"{path} cannot be read ({error.strerror or error})") from None
    return loaded


# --------------------------------------------------------------------------- telling the container


def _parses_as_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def container_by_content(path: Path) -> Container | None:
    """``Container.SAFETENSORS`` or ``Container.PICKLE`` from the content of ``path``; None if neither.

    The safetensors layout is tested first: an 8-byte little-endian header length that fits the file,
    then a JSON object.  Its first byte is the length's low byte, which may well be 0x80, the pickle
    marker, so that marker is only believed when the layout does not hold.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
        length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
        layout = head[8:9] == b"{" and 2 <= length <= size - 8
        pickle_marker = head.startswith(ZIP_MAGIC) or head[:1] == b"\x80"  # torch zip, or pickle protocol >= 2
        if layout and (not pickle_marker or length > _MAX_SNIFFED_HEADER):
            return Container.SAFETENSORS  # a damaged header is reported by the reader
        if layout and _parses_as_json_object(head[8:] + handle.read(length - 1)):
            return Container.SAFETENSORS
    return Container.PICKLE if pickle_marker else None


def _sniff_container(path: Path) -> Container:
    content = container_by_content(path)
    suffix = path.suffix.lower()
    if content is Container.SAFETENSORS or (content is None and suffix in SAFETENSORS_SUFFIXES):
        return Container.SAFETENSORS  # a damaged .safetensors file: the reader says what is wrong
    if content is Container.PICKLE or suffix in PICKLE_SUFFIXES:
        return Container.PICKLE
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"GGUF"):
        raise ModelFileError(f"{path} is a GGUF (quantised) file; only .safetensors and .ckpt checkpoints are read")
    raise ModelFileError(
        f"{path} is not a model file this loader reads (expected .safetensors, or .ckpt/.pt/.pth/.bin/.pkl)"
    )


# --------------------------------------------------------------------------- opening


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
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes)")
    if _sniff_container(path) is Container.SAFETENSORS:
        shapes, metadata = read_safetensors_header(path)
        return OpenedCheckpoint(path, Container.SAFETENSORS, shapes, metadata=metadata)
    with open(path, "rb") as handle:
        mapped = mmap and handle.read(4) == ZIP_MAGIC  # legacy (non-zip) torch.save files cannot be mapped
    loaded = load_tensors_only(path, mmap=mapped)
    if not isinstance(loaded, dict):
        raise ModelFileError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors: not a model checkpoint")
    top_keys = frozenset(str(key) for key in loaded)
    tensors = state_dict_tensors(loaded)
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    return OpenedCheckpoint(path, Container.PICKLE, shapes, top_keys=top_keys, tensors=tensors, mapped=mapped)


def state_dict_tensors(loaded: dict) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint dict under string keys, ``state_dict`` nesting unwrapped."""
    state: Any = loaded
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style {"state_dict": {...}, "global_step": ...}
    return {key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
