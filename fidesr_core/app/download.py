"""Fetching the released files from the Hugging Face Hub — only when the user asks (``download`` command)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelFileError

__all__ = ["FIDESR_WEIGHTS_SOURCE", "SD21_BASE_SOURCE", "download_models"]

FIDESR_WEIGHTS_SOURCE = ("jmjin2/FiDeSR", "fidesr.pkl")
SD21_BASE_SOURCE = ("stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors")


def _fetch(repo_id: str, filename: str, destination: Path) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:  # pragma: no cover - diffusers depends on it
        raise ModelFileError("downloading needs the huggingface_hub package (pip install huggingface_hub)") from error
    target = destination / filename
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=destination))
    except Exception as error:  # the hub raises many kinds; all mean "not fetched"
        raise ModelFileError(
            f"could not download {filename} from https://huggingface.co/{repo_id} ({type(error).__name__}: {error}); "
            f"download it by hand into {destination}"
        ) from error


def download_models(destination: str | os.PathLike, *, include_base: bool = True) -> list[Path]:
    """Download ``fidesr.pkl`` (and SD 2.1-base as one safetensors file) into ``destination``; skip existing."""
    folder = Path(destination)
    folder.mkdir(parents=True, exist_ok=True)
    sources = [FIDESR_WEIGHTS_SOURCE] + ([SD21_BASE_SOURCE] if include_base else [])
    return [_fetch(repo_id, filename, folder) for repo_id, filename in sources]
