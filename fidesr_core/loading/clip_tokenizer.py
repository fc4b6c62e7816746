"""SD 2's CLIP tokenizer for every prompt: a diffusers base folder's own ``tokenizer/``, else the copy shipped
in ``configs/sd21_base/tokenizer/`` (docs/algorithm.md §9.4).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ModelFileError

if TYPE_CHECKING:  # transformers is imported when a tokenizer is needed: it takes seconds
    from transformers import CLIPTokenizer

BUNDLED_TOKENIZER_DIR = Path(__file__).resolve().parent / "configs" / "sd21_base" / "tokenizer"


def tokenizer_folder(base_path: str | os.PathLike | None = None) -> Path:
    """``<base>/tokenizer`` when ``base_path`` is a diffusers folder that has one, else the bundled tokenizer."""
    if base_path is not None:
        candidate = Path(base_path).expanduser() / "tokenizer"
        if candidate.is_dir() and all((candidate / name).is_file() for name in ("vocab.json", "merges.txt")):
            return candidate
    return BUNDLED_TOKENIZER_DIR


@cache
def load_clip_tokenizer(folder: str | os.PathLike | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer in ``folder`` (None: the bundled one), cached per argument; ModelFileError naming
    the folder if it is unusable."""
    from transformers import CLIPTokenizer

    folder = Path(folder) if folder is not None else BUNDLED_TOKENIZER_DIR
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelFileError(f"{folder} is not a usable CLIP tokenizer ({error})") from error
    if folder == BUNDLED_TOKENIZER_DIR or tokenizer.model_max_length > 1000:  # an unset maximum reads as 1e30
        tokenizer.model_max_length = 77
    return tokenizer


def prompt_ids(text: str, folder: str | os.PathLike | None = None, *, length: int = 77) -> torch.Tensor:
    """Token ids ``[1, length]`` of ``text`` as the released scripts tokenize it (padded, truncated), by the
    tokenizer in ``folder`` (None: the bundled one)."""
    encoded = load_clip_tokenizer(folder)(
        text, max_length=length, padding="max_length", truncation=True, return_tensors="pt"
    )
    return encoded.input_ids.long()
