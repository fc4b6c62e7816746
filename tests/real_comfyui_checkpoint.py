"""``python real_comfyui_checkpoint.py COMFYUI_DIR WORK_DIR``: FiDeSR Model from Checkpoint on a REAL ComfyUI (``--cpu``).

Run by ``test_nodes_real_comfyui.py``.  A full-size random SD 2.1-base (ComfyUI's model detection needs
the real sizes) is written once in the original single-file layout (cached under ``FIDESR_TEST_CACHE``,
default the temp folder); for each family, random weights.  Load Checkpoint (ComfyUI's own node) ->
FiDeSR Model from Checkpoint and Load FiDeSR Model on the same file must give the same images, tiled and
untiled, fp32.  Reported as JSON: the largest difference in 8-bit levels, seconds, what ComfyUI held.
"""

from __future__ import annotations

import json
import os
import runpy
import tempfile
import time
from pathlib import Path

# isort: off
from real_comfyui_boot import TESTS_DIR, WORK_DIR  # first: ComfyUI on the path, its arguments

# isort: on
import comfy.model_management as model_management
import folder_paths
import torch
from comfy_stub import import_pack, node_classes

import nodes as comfy_nodes  # ComfyUI's own nodes (Load Checkpoint)
from fidesr_core.loading.base_model import SD21_BASE_CONFIG_DIR
from fidesr_core.loading.weights import save_restorer_weights
from fidesr_core.networks import tiny

helpers = runpy.run_path(str(TESTS_DIR / "node_helpers.py"))  # by path: ComfyUI has a node_helpers module too
run_node = helpers["run_node"]
torch.set_num_threads(2)
FAMILIES = {
    "fidesr": tiny.tiny_fidesr_weights,
    "pisa-sr": tiny.tiny_pisa_sr_weights,
    "osediff": tiny.tiny_osediff_weights,
}


def full_size_base():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fidesr_core.networks.model import BaseModel

    torch.manual_seed(0)
    return BaseModel(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD21_BASE_CONFIG_DIR, subfolder="unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_BASE_CONFIG_DIR, subfolder="vae")),
        text_encoder=CLIPTextModel(
            CLIPTextConfig.from_json_file(str(SD21_BASE_CONFIG_DIR / "text_encoder/config.json"))
        ),
        source="random",
        kind="random",
    )


def write_models(checkpoints: Path, fidesr: Path) -> None:
    cache = Path(os.environ.get("FIDESR_TEST_CACHE", tempfile.gettempdir())) / "fidesr-real-comfyui-sd21"
    files = [cache / "sd21-random.safetensors", *(cache / f"{family}.safetensors" for family in FAMILIES)]
    if not all(file.is_file() for file in files):
        from ldm_export import write_ldm_checkpoint

        cache.mkdir(parents=True, exist_ok=True)
        base = full_size_base()
        for index, (family, make) in enumerate(FAMILIES.items()):
            save_restorer_weights(make(base, seed=10 + index, scale=0.02), cache / f"{family}.safetensors")
        write_ldm_checkpoint(base, cache / "sd21-random.partial.safetensors", dtype=torch.float16)
        (cache / "sd21-random.partial.safetensors").replace(files[0])
        del base
    for folder in (checkpoints, fidesr):
        folder.mkdir(parents=True, exist_ok=True)
    (checkpoints / "sd21-random.safetensors").symlink_to(files[0])
    for family in FAMILIES:
        (fidesr / f"{family}.safetensors").symlink_to(cache / f"{family}.safetensors")


write_models(WORK_DIR / "checkpoints", WORK_DIR / "fidesr")
folder_paths.add_model_folder_path("checkpoints", str(WORK_DIR / "checkpoints"), is_default=True)
pack = import_pack(TESTS_DIR.parent)
folder_paths.add_model_folder_path("fidesr", str(WORK_DIR / "fidesr"), is_default=True)
in_comfyui = type("InComfyUI", (), {"nodes": node_classes(pack)})
image = torch.rand((1, 64, 64, 3), generator=torch.Generator().manual_seed(7))
report: dict = {"families": {}}


def upscale(handle, **settings) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    (result,) = run_node(in_comfyui, "FiDeSRUpscale", model=handle, image=image, seed=3, **settings)
    return result, time.perf_counter() - start


def levels(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() * 255)


# Each upscale runs a full-size SD 2.1 at 512 px (the smallest the pipeline works at): about a minute on 2 cores.
CASES = {
    "fidesr": {"untiled": {}, "tiled": {"tile_size": 32, "tile_overlap": 16}},
    "pisa-sr": {"untiled": {}, "adjustable": {"pixel_strength": 1.0, "semantic_strength": 0.5}},
    "osediff": {"untiled": {}},
}
with torch.inference_mode():
    checkpoint = comfy_nodes.CheckpointLoaderSimple().load_checkpoint("sd21-random.safetensors")
model, clip, vae = checkpoint[:3]
for family in FAMILIES:
    model_management.unload_all_models()
    (ours,) = run_node(
        in_comfyui,
        "FiDeSRModelFromCheckpoint",
        sd_model=model,
        clip=clip,
        vae=vae,
        fidesr_weights=f"{family}.safetensors",
    )
    family_cases = CASES[family]
    outputs = {name: upscale(ours, **settings) for name, settings in family_cases.items()}
    held = [type(entry.model.model).__name__ for entry in model_management.current_loaded_models]
    model_management.unload_all_models()
    (loaded,) = run_node(
        in_comfyui,
        "FiDeSRModelLoader",
        base_model="checkpoints/sd21-random.safetensors",
        fidesr_weights=f"{family}.safetensors",
        precision="fp32",
    )
    report["families"][family] = {
        "family": ours.family_name,
        "held_by_comfyui": held,
        "user_model_unpatched": not model.patches,
        "cases": {
            name: {
                "levels": levels(outputs[name][0], upscale(loaded, **settings)[0]),
                "seconds": round(outputs[name][1], 2),
            }
            for name, settings in family_cases.items()
        },
    }
    del loaded
print("REPORT " + json.dumps(report, default=str))
