"""Run the pack's nodes on ComfyUI's REAL memory manager and V3 API; print what happened as JSON.

Run by ``test_nodes_real_comfyui.py`` in a subprocess (real ComfyUI modules and the stand-ins
cannot share one process):  ``python real_comfyui_check.py COMFYUI_DIR WORK_DIR``.  ComfyUI runs as
with ``--cpu``.  Nodes are executed as ComfyUI's executor executes V3 nodes
(``PREPARE_CLASS_CLONE`` + ``EXECUTE_NORMALIZED``), on tiny random models written to ``WORK_DIR``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

COMFYUI_DIR, WORK_DIR = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
TESTS_DIR = Path(__file__).resolve().parent
PACK_ROOT = TESTS_DIR.parent
sys.path[:0] = [str(COMFYUI_DIR), str(TESTS_DIR), str(PACK_ROOT)]
sys.argv = ["main.py", "--cpu"]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402
from comfy_api.v0_0_2 import ComfyExtension  # noqa: E402
from comfy_stub import import_pack  # noqa: E402
from ldm_export import write_diffusers_folder  # noqa: E402

from fidesr_core.loading.weights import save_restorer_weights  # noqa: E402
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights  # noqa: E402

torch.set_num_threads(1)
report: dict[str, Any] = {}

# ---------------------------------------------------------------- what the memory manager is asked and does
loads: list[tuple[str, int]] = []  # (network, bytes) each time a patcher had to load weights
requests: list[tuple[str, ...]] = []  # networks asked for by each load_models_gpu call
_load, _load_models_gpu = comfy.model_patcher.ModelPatcher.load, model_management.load_models_gpu


def counting_load(self, device_to=None, *args, **kwargs):
    before = self.model.model_loaded_weight_memory
    result = _load(self, device_to, *args, **kwargs)
    if self.model.model_loaded_weight_memory > before:
        loads.append((type(self.model).__name__, self.model.model_loaded_weight_memory - before))
    return result


def recording_load_models_gpu(models, *args, **kwargs):
    requests.append(tuple(type(patcher.model).__name__ for patcher in models))
    return _load_models_gpu(models, *args, **kwargs)


comfy.model_patcher.ModelPatcher.load = counting_load
model_management.load_models_gpu = recording_load_models_gpu

# ---------------------------------------------------------------- the pack, loaded as ComfyUI loads it
models = WORK_DIR / "models"
base = tiny_base_model(seed=4)
write_diffusers_folder(base, models / "diffusers" / "tiny-sd21")
(models / "fidesr").mkdir(parents=True, exist_ok=True)
save_restorer_weights(tiny_fidesr_weights(base, seed=5), models / "fidesr" / "tiny.safetensors")
folder_paths.add_model_folder_path("diffusers", str(models / "diffusers"), is_default=True)
pack = import_pack(PACK_ROOT)
folder_paths.add_model_folder_path("fidesr", str(models / "fidesr"), is_default=True)
extension = asyncio.run(pack.comfy_entrypoint())
report["extension_is_comfy_extension"] = isinstance(extension, ComfyExtension)
nodes = {node.GET_SCHEMA().node_id: node for node in asyncio.run(extension.get_node_list())}
report["node_info"] = {node_id: node.GET_NODE_INFO_V1() for node_id, node in nodes.items()}


def run(node_id: str, **inputs: Any) -> tuple:
    clone = nodes[node_id].PREPARE_CLASS_CLONE(None)
    with torch.inference_mode():
        return clone.EXECUTE_NORMALIZED(**inputs).result


def error_of(node_id: str, **inputs: Any) -> str:
    try:
        run(node_id, **inputs)
    except Exception as error:  # the executor shows any exception on the node and keeps serving
        return f"{type(error).__name__}: {error}"
    return "no error"


(handle,) = run("FiDeSRModelLoader", base_model="diffusers/tiny-sd21", fidesr_weights="tiny.safetensors")
image = torch.rand((1, 32, 32, 3), generator=torch.Generator().manual_seed(7))


def one_node(seed: int) -> torch.Tensor:
    return run("FiDeSRUpscale", model=handle, image=image, seed=seed)[0]


def chain(seed: int) -> torch.Tensor:
    (latent,) = run("FiDeSREncode", model=handle, image=image, seed=seed)
    (latent,) = run("FiDeSRResidual", model=handle, latent=latent)
    (latent,) = run("FiDeSRRefine", model=handle, latent=latent)
    (latent,) = run("FiDeSRLowFrequencyInject", latent=latent)
    (latent,) = run("FiDeSRHighFrequencyInject", latent=latent)
    return run("FiDeSRDecode", model=handle, latent=latent)[0]


def measured(name: str, function, seed: int) -> torch.Tensor:
    loads.clear()
    requests.clear()
    result = function(seed)
    report.setdefault("runs", []).append({"run": name, "loads": list(loads), "requests": list(requests)})
    return result


outputs = defaultdict(list)
for run_index in range(2):  # a second run with another seed re-runs every node but the (cached) loader
    outputs["one_node"].append(measured(f"one_node {run_index + 1}", one_node, run_index))
    outputs["chain"].append(measured(f"chain {run_index + 1}", chain, run_index))
report["one_node_equals_chain"] = all(
    torch.equal(a, b) for a, b in zip(outputs["one_node"], outputs["chain"], strict=True)
)
ours = {id(patcher) for patcher in handle.patchers.values()}
report["resident"] = sorted(
    type(entry.model.model).__name__ for entry in model_management.current_loaded_models if id(entry.model) in ours
)
model_management.unload_all_models()  # what "Unload models" (POST /free) calls
report["resident_after_unload"] = [entry.model for entry in model_management.current_loaded_models]
outputs["after_unload"].append(measured("one_node after unload", one_node, 0))
report["same_after_unload"] = torch.equal(outputs["after_unload"][0], outputs["one_node"][0])

# ---------------------------------------------------------------- a partial load (what --lowvram does on a GPU)
model_management.unload_all_models()
unet = handle.patchers["unet"]
restoration = sys.modules[f"{pack.__name__}.fidesr_core.ops.restoration"]
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

# ---------------------------------------------------------------- bad inputs raise errors naming the node
plain = {"samples": torch.zeros((1, 4, 8, 8))}
report["errors"] = {
    "plain latent": error_of("FiDeSRLowFrequencyInject", latent=plain),
    "not a model": error_of("FiDeSRUpscale", model="not a model", image=image),
    "overlap": error_of("FiDeSRUpscale", model=handle, image=image, tile_size=32, tile_overlap=32),
    "wrong clip": error_of("FiDeSRUpscale", model=handle, image=image, positive=[[torch.zeros((1, 77, 768)), {}]]),
    "upscale_by": error_of("FiDeSREncode", model=handle, image=image, upscale_by=20.0),
    "missing weights": error_of("FiDeSRModelLoader", base_model="diffusers/tiny-sd21", fidesr_weights="nope.pkl"),
}
report["oom_exception"] = model_management.OOM_EXCEPTION.__name__
print("REPORT " + json.dumps(report, default=str))
