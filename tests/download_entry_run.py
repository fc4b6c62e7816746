"""Test helper, run as a script: Load FiDeSR Model's download entries in a fresh process, as ComfyUI runs them.

``huggingface_hub`` reads ``HF_ENDPOINT`` when it is imported, so each run is its own process
started with ``HF_ENDPOINT`` pointing at the stand-in Hub (``hub_stand_in``) of the calling test.
The pack is imported with the ComfyUI stand-ins (``comfy_stub``) over ``MODELS_DIR``.

    python download_entry_run.py MODELS_DIR ACTION [VALUE ...]

Actions (one JSON object on the last line of stdout):

* ``lists``: the loader's two file lists;
* ``validate BASE WEIGHTS``: what ``validate_inputs`` says;
* ``resolve KIND VALUE``: the path ``resolve_base_model`` / ``resolve_fidesr_weights`` gives (KIND ``base`` or
  ``weights``), fetching a download entry;
* ``load BASE WEIGHTS``: run the loader; the family it loaded and the progress the bar got;
* ``load-interrupted BASE WEIGHTS [BYTES]``: the same with ComfyUI's Cancel pressed before it starts, or
  once BYTES of a download are staged (``.fidesr-download/*.part`` in any model folder).

``EXTRA_MODEL_PATHS`` (JSON ``{folder: [path, ...]}``) adds model folder paths before the pack is imported, as
ComfyUI does for ``extra_model_paths.yaml``.

A node error or ComfyUI's interrupt is reported as ``{"error": message}`` or ``{"interrupted": true}``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from comfy_stub import import_pack, install_comfy_stubs, node_classes

PACK_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> dict:
    models_dir, action, *values = argv
    stub = install_comfy_stubs(Path(models_dir))
    for folder, paths in json.loads(os.environ.get("EXTRA_MODEL_PATHS", "{}")).items():
        for path in paths:
            stub.add_model_folder_path(folder, path)
    pack = import_pack(PACK_ROOT)
    loader = node_classes(pack)["FiDeSRModelLoader"]
    folders = importlib.import_module(f"{pack.__name__}.nodes.model_folders")
    errors = importlib.import_module(f"{pack.__name__}.nodes.errors")
    interrupt = sys.modules["comfy.model_management"].InterruptProcessingException
    if action == "lists":
        return {"base_model": folders.base_model_choices(), "fidesr_weights": folders.fidesr_weight_choices()}
    if action == "validate":
        return {"valid": loader.validate_inputs(base_model=values[0], fidesr_weights=values[1])}
    if action == "load-interrupted" and len(values) > 2:
        _press_cancel_once_staged(stub, int(values[2]))
    else:
        stub.interrupt_requested = action == "load-interrupted"
    try:
        if action == "resolve":
            resolve = folders.resolve_base_model if values[0] == "base" else folders.resolve_fidesr_weights
            return {"path": resolve(values[1], "Load FiDeSR Model"), "progress": stub.progress}
        output = loader.execute(base_model=values[0], fidesr_weights=values[1], precision="fp32")
    except errors.FiDeSRNodeError as error:
        return {"error": str(error), "progress": stub.progress}
    except interrupt:
        return {"interrupted": True, "progress": stub.progress}
    (handle,) = output.result
    return {"family": handle.family_name, "text": output.ui.as_dict()["text"][0], "progress": stub.progress}


def _press_cancel_once_staged(stub, staged_bytes: int) -> None:
    """ComfyUI's interrupt flag turns on once ``staged_bytes`` of a download are in a part file."""
    model_management = sys.modules["comfy.model_management"]

    def interrupted() -> bool:
        parts = stub.models_dir.glob("**/.fidesr-download/*.part")
        if sum(part.stat().st_size for part in parts) >= staged_bytes:
            stub.interrupt_requested = True
        return stub.interrupt_requested

    model_management.processing_interrupted = interrupted


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
