"""``torch.load`` for model files users bring: tensors and plain containers only.

Every ``.pkl`` / ``.ckpt`` / ``.pt`` is read with ``weights_only=True``, so a
pickle that asks for a Python object is refused before anything in it runs.
Each way a file can fail becomes one sentence naming the file, raised as the
caller's error class with the caller's "expected …" hint.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from ..errors import ModelFileError

__all__ = ["ZIP_MAGIC", "load_tensors_only"]

ZIP_MAGIC = b"PK\x03\x04"  # a torch.save zip archive starts with this

_READ_ERRORS = (EOFError, OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError)


def load_tensors_only(
    path: Path,
    *,
    mmap: bool,
    error: type[ModelFileError] = ModelFileError,
    expected: str = "",
) -> object:
    """What ``torch.save`` wrote to ``path``, on the CPU; a zip archive is memory-mapped when ``mmap`` is set.

    ``expected`` (e.g. "SD 2.x checkpoint") ends every message as "; expected …".
    """
    hint = f"; expected {expected}" if expected else ""
    if path.stat().st_size == 0:
        raise error(f"{path} is empty (0 bytes){hint}")
    # torch.load hands paths ending in .safetensors to safetensors: give it the open file then (no mmap).
    by_path = not str(path).endswith(".safetensors")
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices from the weights-only unpickler
            mapped = mmap and by_path and handle.read(4) == ZIP_MAGIC  # legacy torch.save files cannot be mapped
            handle.seek(0)
            return torch.load(path if by_path else handle, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as failure:
        raise error(_unpickling_message(path, str(failure)) + hint) from None
    except _READ_ERRORS as failure:
        detail = re.split(r"(?<=\.)\s", str(failure).strip() or type(failure).__name__)[0][:160]  # first sentence
        raise error(f"{path} is truncated or damaged: it cannot be read as a PyTorch file ({detail}){hint}") from None


def _unpickling_message(path: Path, failure: str) -> str:
    refused = re.search(r"GLOBAL\s+([\w.]+)", failure)
    if refused:
        return (
            f"{path} was refused: it contains code or Python objects that we refuse to load (it asks for "
            f"{refused.group(1)!r}); model files are read with torch.load(weights_only=True), which allows tensors "
            "and plain containers only, and nothing in the file was run. A .safetensors copy avoids this"
        )
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)\n", failure + "\n")
    detail = reason.group(1).strip() if reason else "unreadable pickle"
    return f"{path} is not a readable PyTorch file ({detail}): damaged, or not written by torch.save"
