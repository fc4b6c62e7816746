"""Model folders: the new ``fidesr`` folder and the base-model choices.

``models/fidesr/`` holds FiDeSR weights (``.pkl``, ``.safetensors``).  ComfyUI
reads ``extra_model_paths.yaml`` before it imports custom nodes, so a
``fidesr:`` entry there already exists when ``register_fidesr_folder`` runs:
its paths are kept (first, as listed) and the default folder is appended.

Base models are SD 2.1-base diffusers folders (in the ``diffusers`` model
folders) or single files (in ``checkpoints``).  The combo values say which:
``diffusers/<folder>`` or ``checkpoints/<file>``, so a stored workflow value
never depends on which folders happen to exist.
"""

from __future__ import annotations

import logging
import os

import folder_paths

from .errors import node_error

__all__ = [
    "FIDESR_FOLDER",
    "FIDESR_EXTENSIONS",
    "DIFFUSERS_PREFIX",
    "CHECKPOINTS_PREFIX",
    "register_fidesr_folder",
    "fidesr_weight_choices",
    "diffusers_folder_names",
    "base_model_choices",
    "resolve_base_model",
    "resolve_fidesr_weights",
]

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


def fidesr_weight_choices() -> list[str]:
    return list(folder_paths.get_filename_list(FIDESR_FOLDER))


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
    folders = [DIFFUSERS_PREFIX + name for name in diffusers_folder_names()]
    files = [CHECKPOINTS_PREFIX + name for name in folder_paths.get_filename_list("checkpoints")]
    return folders + files


def resolve_base_model(choice: str, node: str) -> str:
    """The path of a ``base_model`` combo value."""
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
            f"({', '.join(searched)}); put the Stable Diffusion 2.1-base diffusers folder there",
        )
    if choice.startswith(CHECKPOINTS_PREFIX):
        name = choice[len(CHECKPOINTS_PREFIX) :]
        path = folder_paths.get_full_path("checkpoints", name)
        if path is None:
            raise node_error(
                node,
                f"base_model {choice!r}: no file {name!r} in the checkpoints model folders "
                f"({', '.join(folder_paths.get_folder_paths('checkpoints'))}); put "
                "v2-1_512-ema-pruned.safetensors there",
            )
        return path
    raise node_error(
        node, f"base_model {choice!r} is neither {DIFFUSERS_PREFIX}<folder> nor {CHECKPOINTS_PREFIX}<file>"
    )


def resolve_fidesr_weights(name: str, node: str) -> str:
    """The path of a ``fidesr_weights`` combo value."""
    path = folder_paths.get_full_path(FIDESR_FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(FIDESR_FOLDER))
        raise node_error(
            node, f"fidesr_weights {name!r} is not in the fidesr model folders ({folders}); put fidesr.pkl there"
        )
    return path
