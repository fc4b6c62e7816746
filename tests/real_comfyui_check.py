"""``python real_comfyui_check.py COMFYUI_DIR WORK_DIR``: the nodes on a REAL ComfyUI (``--cpu``), reported as JSON.

Run by ``test_nodes_real_comfyui.py`` in a subprocess (real ComfyUI modules and the stand-ins cannot share one
process): how ComfyUI describes the nodes, and what its memory manager did while they ran on tiny models.
"""

from __future__ import annotations

import asyncio
import json
import runpy
import sys
from types import SimpleNamespace

# isort: off
from real_comfyui_boot import TESTS_DIR, WORK_DIR  # first: ComfyUI on the path, its arguments

# isort: on
import comfy.model_management as model_management
import comfy.model_patcher
import folder_paths
import torch
from comfy_stub import import_pack
from ldm_export import write_diffusers_folder

from fidesr_core.loading.weights import save_restorer_weights
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights

helpers = runpy.run_path(str(TESTS_DIR / "node_helpers.py"))  # by path: ComfyUI has a node_helpers module too
chain, error_of, run_node = helpers["chain"], helpers["error_of"], helpers["run_node"]
torch.set_num_threads(1)
report = {}

# What each load_models_gpu call asks for (networks) and what it has to load (network, bytes).
loads, requests, _load_models_gpu = [], [], model_management.load_models_gpu


def recording_load_models_gpu(models, *args, **kwargs):
    before = [patcher.model.model_loaded_weight_memory for patcher in models]
    result = _load_models_gpu(models, *args, **kwargs)
    requests.append(tuple(type(patcher.model).__name__ for patcher in models))
    for patcher, was in zip(models, before, strict=True):
        if patcher.model.model_loaded_weight_memory > was:
            loads.append((type(patcher.model).__name__, patcher.model.model_loaded_weight_memory - was))
    return result


model_management.load_models_gpu = recording_load_models_gpu

# The pack, loaded as ComfyUI loads it, and tiny model files where ComfyUI looks for them.
models = WORK_DIR / "models"
base = tiny_base_model(seed=4)
write_diffusers_folder(base, models / "diffusers" / "tiny")
(models / "fidesr").mkdir(parents=True, exist_ok=True)
save_restorer_weights(tiny_fidesr_weights(base, seed=5), models / "fidesr" / "tiny.safetensors")
folder_paths.add_model_folder_path("diffusers", str(models / "diffusers"), is_default=True)
pack = import_pack(TESTS_DIR.parent)
folder_paths.add_model_folder_path("fidesr", str(models / "fidesr"), is_default=True)
extension = asyncio.run(pack.comfy_entrypoint())
nodes = {node.GET_SCHEMA().node_id: node for node in asyncio.run(extension.get_node_list())}
report["node_info"] = {node_id: node.GET_NODE_INFO_V1() for node_id, node in nodes.items()}  # what /object_info serves
in_comfyui = SimpleNamespace(nodes=nodes, module=lambda name: sys.modules[f"{pack.__name__}.{name}"])
if hasattr(comfy.model_patcher, "CoreModelPatcher"):  # 0.33+: as its start-up sets it where dynamic VRAM works
    comfy.model_patcher.CoreModelPatcher = type("DynamicStandIn", (comfy.model_patcher.ModelPatcher,), {})
comfys_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)  # its models' class
(handle,) = run_node(in_comfyui, "FiDeSRModelLoader", base_model="diffusers/tiny", fidesr_weights="tiny.safetensors")
report["patchers_of_comfys_class"] = all(type(patcher) is comfys_class for patcher in handle.patchers.values())
image = torch.rand((1, 32, 32, 3), generator=torch.Generator().manual_seed(7))
runs = {
    "one_node": lambda seed: run_node(in_comfyui, "FiDeSRUpscale", model=handle, image=image, seed=seed)[0],
    "chain": lambda seed: chain(in_comfyui, handle, image, encode={"seed": seed})["image"],
}


def measured(name: str, seed: int) -> torch.Tensor:
    del loads[:], requests[:]
    result = runs[name.split()[0]](seed)
    report.setdefault("runs", []).append({"run": name, "loads": list(loads), "requests": list(requests)})
    return result


# A second run with another seed re-runs every node but the (cached) loader.
outputs = {f"{name} {index + 1}": measured(f"{name} {index + 1}", index) for index in range(2) for name in runs}
report["one_node_equals_chain"] = all(torch.equal(outputs[f"one_node {i}"], outputs[f"chain {i}"]) for i in (1, 2))
ours = {id(patcher) for patcher in handle.patchers.values()}
resident = [entry.model.model for entry in model_management.current_loaded_models if id(entry.model) in ours]
report["resident"] = sorted(type(network).__name__ for network in resident)
model_management.unload_all_models()  # what "Unload models" (POST /free) calls
report["resident_after_unload"] = [entry.model for entry in model_management.current_loaded_models]
report["same_after_unload"] = torch.equal(measured("one_node after unload", 0), outputs["one_node 1"])

# A partial load (what --lowvram does on a GPU) gives the same U-Net result.
model_management.unload_all_models()
unet = handle.patchers["unet"]
restoration = in_comfyui.module("fidesr_core.ops.restoration")
z_lq = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    full = restoration.predict_residual(handle.model, z_lq, tile_size=0)
    unet.load(torch.device("cpu"), lowvram_model_memory=unet.model_size() // 3)
    partial = restoration.predict_residual(handle.model, z_lq, tile_size=0, device=torch.device("cpu"))
report["partial_load"] = {
    "lowvram": bool(unet.model.model_lowvram),
    "loaded_fraction": unet.loaded_size() / unet.model_size(),
    "cast_layers": sum(bool(getattr(m, "comfy_cast_weights", False)) for m in handle.model.unet.modules()),
    "equal": torch.equal(full, partial),
}
unet.detach()

# Bad inputs raise FiDeSRNodeError (node_helpers.error_of checks it) with messages naming the node.
report["errors"] = {
    "plain latent": error_of(in_comfyui, "FiDeSRLowFrequencyInject", latent={"samples": torch.zeros((1, 4, 8, 8))}),
    "not a model": error_of(in_comfyui, "FiDeSRUpscale", model="not a model", image=image),
    "overlap": error_of(in_comfyui, "FiDeSRUpscale", model=handle, image=image, tile_size=32, tile_overlap=32),
    "wrong clip": error_of(
        in_comfyui, "FiDeSRUpscale", model=handle, image=image, positive=[[torch.zeros((1, 77, 768)), {}]]
    ),
    "upscale_by": error_of(in_comfyui, "FiDeSREncode", model=handle, image=image, upscale_by=20.0),
    "missing weights": error_of(in_comfyui, "FiDeSRModelLoader", base_model="diffusers/tiny", fidesr_weights="x.pkl"),
}
report["oom_exception"] = model_management.OOM_EXCEPTION.__name__
print("REPORT " + json.dumps(report, default=str))
