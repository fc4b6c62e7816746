"""Model folders: the new ``fidesr`` folder, the loader's choices, and resolving a choice to a path.

``models/fidesr/`` holds the weights of FiDeSR, PiSA-SR and OSEDiff (``.pkl``, ``.safetensors``).  ComfyUI
reads ``extra_model_paths.yaml`` before it imports custom nodes, so a
``fidesr:`` entry there already exists when ``register_fidesr_folder`` runs:
its paths are kept (first, as listed) and the default folder is appended.

Base models are SD 2.1-base diffusers folders (in the ``diffusers`` model
folders) or single files (in ``checkpoints``).  The combo values say which:
``diffusers/<folder>`` or ``checkpoints/<file>``, so a stored workflow value
never depends on which folders happen to exist.  Either list may also hold a
download entry (``model_downloads``): resolving one fetches the file.  An error
for a missing file names the file, the folders searched (absolute paths,
extra_model_paths.yaml's included) and where the file comes from.
"""

from __future__ import annotations

import logging
import os

import folder_paths

from ..fidesr_core.app.download import FIDESR_WEIGHTS, RELEASED_WEIGHTS, SD21_BASE, KnownFile
from .errors import node_error
from .model_downloads import download_entry, fetch_entry, folder_list, known_file_of

FIDESR_FOLDER = "fidesr"
FIDESR_EXTENSIONS = frozenset({".pkl", ".safetensors"})
DIFFUSERS_PREFIX = "diffusers/"
CHECKPOINTS_PREFIX = "checkpoints/"

logger = logging.getLogger("FiDeSR")


def register_fidesr_folder() -> None:
    """Add the ``fidesr`` model folder, keeping any paths ``extra_model_paths.yaml`` gave it."""
    default_path = os.path.join(folder_paths.models_dir, FIDESR_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FIDESR_FOLDER)
    if entry is None:
        paths, extensions = [default_path], set()
    else:
        paths, extensions = entry[0], set(entry[1])
        if default_path not in paths:
            paths.append(default_path)
    folder_paths.folder_names_and_paths[FIDESR_FOLDER] = (paths, extensions | FIDESR_EXTENSIONS)
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


def fidesr_weight_choices() -> list[str]:
    """The weights files; with none, the download entry of the authors' FiDeSR weights."""
    files = list(folder_paths.get_filename_list(FIDESR_FOLDER))
    return files or [download_entry(FIDESR_WEIGHTS)]


def diffusers_folder_names() -> list[str]:
    """Folders (relative, ``/``-separated) holding a ``model_index.json`` in any ``diffusers`` path."""
    names: set[str] = set()
    for search_path in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(search_path):
            continue
        for root, subdirs, files in os.walk(search_path, followlinks=True):
            if "model_index.json" in files:
                names.add(os.path.relpath(root, search_path).replace(os.sep, "/"))
                subdirs.clear()  # a model's own sub-folders are not models
    return sorted(names)


def base_model_choices() -> list[str]:
    """Diffusers folders and checkpoints; the base's download entry while no checkpoint has its file name."""
    folders = [DIFFUSERS_PREFIX + name for name in diffusers_folder_names()]
    checkpoints = folder_paths.get_filename_list("checkpoints")
    files = [CHECKPOINTS_PREFIX + name for name in checkpoints]
    has_base = any(os.path.basename(name) == SD21_BASE.name for name in checkpoints)
    return folders + files + ([] if has_base else [download_entry(SD21_BASE)])


def is_known_choice(value: object, choices: list[str]) -> bool:
    """A value the loader can resolve: listed now, or a download entry (listed until its file arrived)."""
    return isinstance(value, str) and (value in choices or known_file_of(value) is not None)


def resolve_base_model(choice: str, node: str) -> str:
    """The path of a ``base_model`` combo value (a download entry is fetched now, unless already there)."""
    known = known_file_of(choice)
    if known is not None:
        return fetch_entry(known, node)
    if choice.startswith(DIFFUSERS_PREFIX):
        name = choice[len(DIFFUSERS_PREFIX) :]
        searched = folder_paths.get_folder_paths("diffusers")
        for search_path in searched:
            candidate = os.path.join(search_path, *name.split("/"))
            if os.path.isfile(os.path.join(candidate, "model_index.json")):
                return candidate
        raise node_error(
            node,
            f"base_model {choice!r}: no folder {name!r} with a model_index.json in the diffusers model folders "
            f"({folder_list('diffusers')}); put the Stable Diffusion 2.1-base diffusers folder there (the "
            f"diffusers folders of Hugging Face {' or '.join(SD21_BASE.sources)})",
        )
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
    known = known_file_of(name)
    if known is not None:
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
