"""Load FiDeSR Model's lists (the ``fidesr`` model folder, SD 2.1 bases, download entries) and their paths.

Base models are ``diffusers/<folder>`` or ``checkpoints/<file>``, so a stored workflow value never depends on
which folders exist.  A download entry (README) is fetched only when the loader resolves it.
"""

from __future__ import annotations

import logging
import os

import comfy.model_management as model_management
import comfy.utils
import folder_paths

from ..fidesr_core.app.download import (
    FIDESR_WEIGHTS,
    RELEASED_WEIGHTS,
    SD21_BASE,
    DownloadError,
    KnownFile,
    fetch_known_file,
)
from ..fidesr_core.errors import Cancelled
from .errors import engine_errors, node_error

FIDESR_FOLDER = "fidesr"
FIDESR_EXTENSIONS = frozenset({".pkl", ".safetensors"})
DIFFUSERS_PREFIX = "diffusers/"
CHECKPOINTS_PREFIX = "checkpoints/"
_COMBO_PREFIX = {FIDESR_WEIGHTS.comfyui_folder: "", SD21_BASE.comfyui_folder: CHECKPOINTS_PREFIX}
_MB = 1 << 20

logger = logging.getLogger("FiDeSR")


def register_fidesr_folder() -> None:
    """Add the ``fidesr`` model folder after any paths ``extra_model_paths.yaml`` gave it."""
    default_path = os.path.join(folder_paths.models_dir, FIDESR_FOLDER)
    folder_paths.add_model_folder_path(FIDESR_FOLDER, default_path)
    paths, extensions = folder_paths.folder_names_and_paths[FIDESR_FOLDER]
    folder_paths.folder_names_and_paths[FIDESR_FOLDER] = (paths, set(extensions) | FIDESR_EXTENSIONS)
    try:
        os.makedirs(default_path, exist_ok=True)  # shows users where the weights go
    except OSError as error:
        logger.debug("could not create %s: %s", default_path, error)


def _from(known) -> str:
    where = f"Hugging Face {known.sources[0]}" if isinstance(known, KnownFile) else known.page
    return f"{known.name} ({known.what}) from {where}"


# Where the files come from, for messages.
WEIGHTS_SOURCES = "; ".join(_from(known) for known in RELEASED_WEIGHTS.values())
BASE_SOURCES = (
    f"{SD21_BASE.name} from Hugging Face {' or '.join(SD21_BASE.sources)} (Stability AI's own repository "
    "was removed in November 2025)"
)


def download_entry(known: KnownFile) -> str:
    """The combo value that asks for ``known`` to be fetched, e.g. ``fidesr.pkl (download from jmjin2/FiDeSR)``."""
    return f"{_COMBO_PREFIX[known.comfyui_folder]}{known.name} (download from {known.sources[0]})"


def known_file_of(value: str) -> KnownFile | None:
    """The file a download entry asks for; None for every other value."""
    return next((known for known in (FIDESR_WEIGHTS, SD21_BASE) if value == download_entry(known)), None)


def folder_list(folder: str) -> str:
    """The absolute paths ComfyUI searches for ``folder`` (its models folder and extra_model_paths.yaml's)."""
    return ", ".join(os.path.abspath(path) for path in folder_paths.get_folder_paths(folder))


def fidesr_weight_choices() -> list[str]:
    """The weights files; with none, the download entry of the authors' FiDeSR weights."""
    return folder_paths.get_filename_list(FIDESR_FOLDER) or [download_entry(FIDESR_WEIGHTS)]


def diffusers_folder_names() -> list[str]:
    """Folders (relative, ``/``-separated) holding a ``model_index.json`` in any ``diffusers`` path."""
    names: set[str] = set()
    for search_path in folder_paths.get_folder_paths("diffusers"):
        for root, subdirs, files in os.walk(search_path, followlinks=True):
            if "model_index.json" in files:
                names.add(os.path.relpath(root, search_path).replace(os.sep, "/"))
                subdirs.clear()  # a model's own sub-folders are not models
    return sorted(names)


def base_model_choices() -> list[str]:
    """Diffusers folders and checkpoints; the base's download entry while no checkpoint has its file name."""
    checkpoints = folder_paths.get_filename_list("checkpoints")
    has_base = any(os.path.basename(name) == SD21_BASE.name for name in checkpoints)
    return (
        [DIFFUSERS_PREFIX + name for name in diffusers_folder_names()]
        + [CHECKPOINTS_PREFIX + name for name in checkpoints]
        + ([] if has_base else [download_entry(SD21_BASE)])
    )


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


def fetch_entry(known: KnownFile, node: str) -> str:
    """The path of ``known`` (the user chose its download entry), fetched now unless it is already there, into
    the folder's first path (ComfyUI's default)."""
    present = folder_paths.get_full_path(known.comfyui_folder, known.name)
    folder = os.path.dirname(present) if present else folder_paths.get_folder_paths(known.comfyui_folder)[0]
    logger.info("%s: %s was chosen for download; getting it into %s", node, known.name, os.path.abspath(folder))
    with engine_errors(node):
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
    return str(path)


def resolve_base_model(choice: str, node: str) -> str:
    """The path of a ``base_model`` combo value (a download entry is fetched now, unless already there)."""
    if known := known_file_of(choice):
        return fetch_entry(known, node)
    if choice.startswith(DIFFUSERS_PREFIX):
        name = choice[len(DIFFUSERS_PREFIX) :]
        index = folder_paths.get_full_path("diffusers", f"{name}/model_index.json")
        if index is None:
            raise node_error(
                node,
                f"base_model {choice!r}: no folder {name!r} with a model_index.json in the diffusers model folders "
                f"({folder_list('diffusers')}); put the Stable Diffusion 2.1-base diffusers folder there (the "
                f"diffusers folders of Hugging Face {' or '.join(SD21_BASE.sources)})",
            )
        return os.path.dirname(index)
    if choice.startswith(CHECKPOINTS_PREFIX):
        name = choice[len(CHECKPOINTS_PREFIX) :]
        path = folder_paths.get_full_path("checkpoints", name)
        if path is None:
            raise node_error(
                node,
                f"base_model {choice!r}: no file {name!r} in the checkpoints model folders "
                f"({folder_list('checkpoints')}); put Stable Diffusion 2.1-base there: {BASE_SOURCES}, or "
                f"choose {download_entry(SD21_BASE)!r} to fetch it",
            )
        return path
    raise node_error(
        node, f"base_model {choice!r} is neither {DIFFUSERS_PREFIX}<folder> nor {CHECKPOINTS_PREFIX}<file>"
    )


def resolve_fidesr_weights(name: str, node: str) -> str:
    """The path of a ``fidesr_weights`` combo value (a download entry is fetched now, unless already there)."""
    if known := known_file_of(name):
        return fetch_entry(known, node)
    path = folder_paths.get_full_path(FIDESR_FOLDER, name)
    if path is None:
        raise node_error(
            node,
            f"fidesr_weights {name!r} is not in the fidesr model folders ({folder_list(FIDESR_FOLDER)}); put the "
            f"weights there: {WEIGHTS_SOURCES}; or choose {download_entry(FIDESR_WEIGHTS)!r} to fetch "
            "FiDeSR's",
        )
    return path
