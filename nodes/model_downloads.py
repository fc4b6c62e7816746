"""Download entries of Load FiDeSR Model: the released files, fetched on first use when the user picks them.

When ``models/fidesr/`` holds no weights, ``fidesr_weights`` lists ``fidesr.pkl (download from
jmjin2/FiDeSR)``; when no checkpoint is named ``v2-1_512-ema-pruned.safetensors``, ``base_model``
lists ``checkpoints/v2-1_512-ema-pruned.safetensors (download from Manojb/stable-diffusion-2-1-base)``.
Choosing such an entry and running the workflow is the user's request: the loader then fetches
the file with ``fidesr_core.app.download.fetch_known_file`` (the sources in order, resumable,
written atomically and checked before it gets its name), with a ComfyUI progress bar in MB and
ComfyUI's Cancel honoured as bytes arrive.  Nothing is ever fetched for any other value, and a
file already there is used (after its check) without a request.  ``HF_ENDPOINT`` and ``HF_TOKEN``
work as everywhere in ``huggingface_hub``.
"""

from __future__ import annotations

import logging
import os

import comfy.model_management as model_management
import comfy.utils
import folder_paths

from ..fidesr_core.app.download import FIDESR_WEIGHTS, SD21_BASE, DownloadError, KnownFile, fetch_known_file
from ..fidesr_core.errors import Cancelled, FiDeSRError
from .errors import node_error

logger = logging.getLogger("FiDeSR")

DOWNLOADABLE: tuple[KnownFile, ...] = (FIDESR_WEIGHTS, SD21_BASE)
_COMBO_PREFIX = {FIDESR_WEIGHTS.comfyui_folder: "", SD21_BASE.comfyui_folder: "checkpoints/"}
_MB = 1 << 20


def download_entry(known: KnownFile) -> str:
    """The combo value that asks for ``known`` to be fetched, e.g. ``fidesr.pkl (download from jmjin2/FiDeSR)``."""
    return f"{_COMBO_PREFIX[known.comfyui_folder]}{known.name} (download from {known.sources[0]})"


def known_file_of(value: str) -> KnownFile | None:
    """The file a download entry asks for; None for every other value."""
    return next((known for known in DOWNLOADABLE if value == download_entry(known)), None)


def folder_list(folder: str) -> str:
    """The absolute paths ComfyUI searches for ``folder`` (its models folder and extra_model_paths.yaml's)."""
    return ", ".join(os.path.abspath(path) for path in folder_paths.get_folder_paths(folder))


class _ByteBar:
    """``fetch_known_file``'s ``progress(bytes, total)`` on one ComfyUI progress bar, in MB."""

    def __init__(self) -> None:
        self.bar: comfy.utils.ProgressBar | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if total is None or total <= 0:
            return
        megabytes = max(1, -(-total // _MB))
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(megabytes)
        shown = megabytes if done >= total else min(megabytes - 1, done // _MB)  # full only once complete
        self.bar.update_absolute(shown, megabytes)


def _target_folder(known: KnownFile) -> str:
    """Where the file is, if it is already in one of the folder's paths; else the first path (ComfyUI's default)."""
    present = folder_paths.get_full_path(known.comfyui_folder, known.name)
    if present is not None:
        return os.path.dirname(present)
    return folder_paths.get_folder_paths(known.comfyui_folder)[0]


def fetch_entry(known: KnownFile, node: str) -> str:
    """The path of ``known``, fetched now unless it is already there (the user chose its download entry)."""
    folder = _target_folder(known)
    logger.info("%s: %s was chosen for download; getting it into %s", node, known.name, os.path.abspath(folder))
    try:
        path = fetch_known_file(
            known,
            folder,
            progress=_ByteBar(),
            report=lambda line: logger.info("%s: %s", node, line),
            should_cancel=model_management.processing_interrupted,
        )
    except Cancelled:
        model_management.throw_exception_if_processing_interrupted()  # ComfyUI's own interrupt
        raise node_error(node, f"the download of {known.name} was stopped; run again to resume it") from None
    except DownloadError as error:
        tried = "; ".join(error.attempts)
        by_hand = " ".join(line.strip() for line in error.by_hand)
        raise node_error(node, f"{error} ({tried}). {by_hand}") from error
    except FiDeSRError as error:
        raise node_error(node, str(error)) from error
    return str(path)
