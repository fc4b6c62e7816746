"""Opening single-file model checkpoints without trusting them.

Files are ``.safetensors`` (header parsed here, tensors read one by one into
aligned buffers) or pickles (``.ckpt``/``.pt``/``.pth``/``.bin``/``.pkl``) read
only with ``torch.load(weights_only=True)``, memory-mapped when the file is a
zip archive.  Telling what a file is lives in ``checkpoint_inspect``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError
from .safe_torch_load import ZIP_MAGIC, load_tensors_only

__all__ = [
    "SAFETENSORS_SUFFIXES",
    "PICKLE_SUFFIXES",
    "CONTAINER_SAFETENSORS",
    "CONTAINER_PICKLE",
    "ZIP_MAGIC",
    "container_by_content",
    "OpenedCheckpoint",
    "open_checkpoint",
    "state_dict_tensors",
]

SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})
CONTAINER_SAFETENSORS = "safetensors"
CONTAINER_PICKLE = "ckpt (pickle)"
_MAX_HEADER_BYTES = 100 * 2**20


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
                    raise ModelFileError(f"{self.path}: tensor {key} has {size} bytes for shape {entry.shape}: damaged")
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
        if prefix.startswith(ZIP_MAGIC):
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


def container_by_content(path: Path) -> str | None:
    """``CONTAINER_PICKLE`` or ``CONTAINER_SAFETENSORS`` from the first bytes of ``path``; None if neither."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(ZIP_MAGIC) or head[:1] == b"\x80":  # torch zip archive, or pickle protocol >= 2
        return CONTAINER_PICKLE
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2:
        return CONTAINER_SAFETENSORS  # 8-byte little-endian header length, then the JSON header
    return None


def _sniff_container(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return CONTAINER_SAFETENSORS
    if suffix in PICKLE_SUFFIXES:
        return CONTAINER_PICKLE
    container = container_by_content(path)
    if container is not None:
        return container
    with open(path, "rb") as handle:
        head = handle.read(4)
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
        mapped = mmap and handle.read(4) == ZIP_MAGIC  # legacy (non-zip) torch.save files cannot be mapped
    loaded = load_tensors_only(path, mmap=mapped)
    if not isinstance(loaded, dict):
        raise ModelFileError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors: not a model checkpoint")
    top_keys = frozenset(str(key) for key in loaded)
    tensors = state_dict_tensors(loaded)
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    return OpenedCheckpoint(path, CONTAINER_PICKLE, shapes, top_keys=top_keys, tensors=tensors, mapped=mapped)


def state_dict_tensors(loaded: dict) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint dict under string keys, ``state_dict`` nesting unwrapped."""
    state: Any = loaded
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style {"state_dict": {...}, "global_step": ...}
    return {key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
