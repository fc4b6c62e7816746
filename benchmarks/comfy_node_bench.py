"""Wall time of the ComfyUI nodes per 128->512 image, and the weights they move, on ComfyUI's memory manager.

Runs the pack's nodes in-process, the way ComfyUI's executor calls V3 nodes, on a model with random
weights of SD 2.1-base's full size (``--model full``, the default on a GPU) or the tests' tiny one:

* ``--comfyui DIR``: a ComfyUI checkout (its requirements installed): the REAL ``model_management``,
  ``ModelPatcher`` and V3 API, on ComfyUI's own device choice (``--cpu`` is passed when there is no
  CUDA).  Without it, the tests' stand-ins (``tests/comfy_stub.py``) with the torch device set to
  ``--device``: the nodes and the engine are the same, ComfyUI's own bookkeeping is not timed.
* FiDeSR Upscale: ``--runs`` timed runs after ``--warmup`` runs, one image (128x128 -> 512x512) per
  run, and the same with a batch of ``--batch`` images (time per image).
* the chain Encode -> One-Step U-Net -> LRRB -> LF -> HF -> Decode: time per node.
* weights the memory manager loaded onto the device in the first and in a later run (bytes).
* ``--lfhf-size 2048``: the LF and HF nodes on a 512x512 -> 2048x2048 latent.

Prints one JSON document.  ComfyUI's server (queue, cache, websocket, PNG encode) adds its own
overhead on top of these numbers.

    python benchmarks/comfy_node_bench.py --device cuda --comfyui /path/to/ComfyUI   # GPU session
    python benchmarks/comfy_node_bench.py --device cpu --model tiny --runs 3           # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "fidesr_core" / "loading" / "configs" / "sd21_base"


def _comfyui_modules(comfyui: str | None, device: torch.device, models_dir: Path) -> dict[str, Any]:
    """Real ComfyUI modules from a checkout, or the tests' stand-ins; returns what the bench needs of them."""
    if comfyui:
        sys.path.insert(0, str(Path(comfyui).resolve()))
        sys.argv = ["main.py", *(["--cpu"] if device.type == "cpu" else [])]
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management
        import comfy.model_patcher
        import folder_paths  # noqa: F401 - the pack registers its model folder with it

        loads: list[int] = []
        original_load = comfy.model_patcher.ModelPatcher.load

        def counting_load(self, device_to=None, *args, **kwargs):
            before = self.model.model_loaded_weight_memory
            result = original_load(self, device_to, *args, **kwargs)
            loads.append(self.model.model_loaded_weight_memory - before)
            return result

        comfy.model_patcher.ModelPatcher.load = counting_load
        return {
            "kind": "real ComfyUI",
            "clear": loads.clear,
            "loaded_bytes": lambda: sum(loads),
            "unload": comfy.model_management.unload_all_models,
        }
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_stub import install_comfy_stubs

    stub = install_comfy_stubs(models_dir)
    stub.torch_device = device  # networks load there; states rest on the CPU as ComfyUI's do
    import comfy.model_management

    return {
        "kind": "tests' stand-ins",
        "clear": stub.loads.clear,
        "loaded_bytes": lambda: sum(patcher.model_size() for patcher in stub.loads),
        "unload": comfy.model_management.unload_all_models,
    }


def _import_pack() -> Any:
    """The repository as ComfyUI imports a custom-node folder (by path, under a path-derived name)."""
    name = str(ROOT).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _model(pack_name: str, size: str, precision: str) -> Any:
    assemble = importlib.import_module(f"{pack_name}.fidesr_core.loading.restorer")
    tiny = importlib.import_module(f"{pack_name}.fidesr_core.networks.tiny")
    if size == "tiny":
        base = tiny.tiny_base_model(seed=1)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        model_module = importlib.import_module(f"{pack_name}.fidesr_core.networks.model")
        torch.manual_seed(0)
        text_config = json.loads((CONFIG_DIR / "text_encoder" / "config.json").read_text())
        base = model_module.BaseModel(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR, subfolder="unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
            source="random",
            kind="random, SD 2.1-base size",
        )
    weights = tiny.tiny_fidesr_weights(base, seed=2)
    return assemble.assemble_restorer(base, weights, precision=precision, device="cpu")


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def timed(function: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--comfyui", help="a ComfyUI checkout: use its real memory manager and V3 API")
    parser.add_argument("--model", choices=("full", "tiny"), help="default: full on a GPU, tiny on the CPU")
    parser.add_argument("--precision", default="fp16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lfhf-size", type=int, default=2048, help="output side for the LF/HF timing; 0 skips it")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.model or ("full" if device.type == "cuda" else "tiny")
    if args.threads:
        torch.set_num_threads(args.threads)
    models_dir = Path("/tmp/fidesr_bench_models")
    comfy = _comfyui_modules(args.comfyui, device, models_dir)
    pack = _import_pack()
    extension = asyncio.run(pack.comfy_entrypoint())
    nodes = {node.GET_SCHEMA().node_id: node for node in asyncio.run(extension.get_node_list())}

    def run(node_id: str, **inputs: Any) -> tuple:
        node = nodes[node_id]
        clone = node.PREPARE_CLASS_CLONE(None) if hasattr(node, "PREPARE_CLASS_CLONE") else node
        with torch.inference_mode():
            output = (
                clone.EXECUTE_NORMALIZED(**inputs) if hasattr(clone, "EXECUTE_NORMALIZED") else clone.execute(**inputs)
            )
        return output.result

    handle_module = importlib.import_module(f"{pack.__name__}.nodes.model_handle")
    handle = handle_module.FiDeSRModelHandle.wrap(
        _model(pack.__name__, size, args.precision), base_name=f"random {size}", weights_name="random"
    )
    timed = _timer(device)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((1, 128, 128, 3), generator=generator)
    batch = torch.rand((args.batch, 128, 128, 3), generator=generator)
    result: dict[str, Any] = {
        "comfyui": comfy["kind"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": size,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
    }

    def weights_moved(function: Callable[[], Any]) -> int:
        comfy["clear"]()
        function()
        return int(comfy["loaded_bytes"]())

    upscale = lambda images: run("FiDeSRUpscale", model=handle, image=images)  # noqa: E731
    result["weights_loaded_bytes"] = {"first run": weights_moved(lambda: upscale(image))}
    result["weights_loaded_bytes"]["second run"] = weights_moved(lambda: upscale(image))
    for _ in range(args.warmup):
        upscale(image)
    single = [timed(lambda: upscale(image)) for _ in range(args.runs)]
    batched = [timed(lambda: upscale(batch)) / args.batch for _ in range(max(1, args.runs // 4))]
    result["upscale_128_to_512_ms"] = {
        "median": 1000 * statistics.median(single),
        "min": 1000 * min(single),
        f"per image in a batch of {args.batch}": 1000 * statistics.median(batched),
    }

    def chain_times(images: torch.Tensor) -> dict[str, float]:
        times: dict[str, float] = {}
        latent: Any = None

        def step(name: str, node_id: str, **inputs: Any) -> None:
            nonlocal latent
            holder: list = []
            times[name] = 1000 * timed(lambda: holder.append(run(node_id, **inputs)[0]))
            latent = holder[0]

        step("encode", "FiDeSREncode", model=handle, image=images)
        step("unet", "FiDeSRResidual", model=handle, latent=latent)
        step("lrrb", "FiDeSRRefine", model=handle, latent=latent)
        step("lf", "FiDeSRLowFrequencyInject", latent=latent)
        step("hf", "FiDeSRHighFrequencyInject", latent=latent)
        step("decode", "FiDeSRDecode", model=handle, latent=latent)
        times["total"] = sum(times.values())
        return times

    chain_runs = [chain_times(image) for _ in range(max(1, args.runs // 4))]
    result["chain_128_to_512_ms"] = {key: statistics.median(run[key] for run in chain_runs) for key in chain_runs[0]}
    result["chain_weights_loaded_bytes_second_run"] = weights_moved(lambda: chain_times(image))
    if args.lfhf_size:
        side = args.lfhf_size // 4
        large = torch.rand((1, side, side, 3), generator=generator)
        result[f"chain_{side}_to_{args.lfhf_size}_ms"] = chain_times(large)
    comfy["unload"]()
    result["weights_loaded_bytes"]["after unload models"] = weights_moved(lambda: upscale(image))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
