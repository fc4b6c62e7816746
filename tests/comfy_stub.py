"""Minimal stand-ins for the ComfyUI modules the nodes import, for tests without ComfyUI.

``install_comfy_stubs(models_dir)`` puts ``comfy``, ``comfy.model_management``,
``comfy.model_patcher``, ``comfy.ops``, ``comfy.utils``, ``folder_paths`` and the
V3 node API (``comfy_api.v0_0_2``, see ``comfy_api_stub``) into ``sys.modules``
(only the names the pack uses, behaving like ComfyUI 0.8 on a ``--cpu`` run)
and returns a ``ComfyStub`` that records what the nodes asked for.  The memory
manager keeps a list of loaded patchers as ComfyUI's does: a patcher asked for
again stays loaded, ``unload_all_models`` (what "Unload models" calls) empties
it.  ``import_pack`` imports
the repository the way ComfyUI imports a custom-node folder: by file path,
under a module name made from that path.  ``remove_from_sys_modules`` undoes
both, so other test files never see fake ComfyUI modules.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from comfy_api_stub import build_comfy_api_modules

__all__ = [
    "ComfyStub",
    "InterruptProcessingException",
    "install_comfy_stubs",
    "import_pack",
    "node_classes",
    "remove_from_sys_modules",
]

STUB_MODULES = (
    "comfy",
    "comfy.model_management",
    "comfy.model_patcher",
    "comfy.ops",
    "comfy.utils",
    "folder_paths",
    "comfy_api",
    "comfy_api.v0_0_2",
)


class InterruptProcessingException(Exception):
    """Stands in for ``comfy.model_management.InterruptProcessingException``."""


@dataclass
class ComfyStub:
    models_dir: Path
    torch_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    intermediate_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    free_memory_bytes: int = 16 * 1024**3  # what get_free_memory reports
    unet_dtype: torch.dtype = torch.float32  # what ComfyUI picks with --cpu
    interrupt_requested: bool = False
    interrupt_after_checks: int | None = None  # raise at the N-th check (None: only when requested)
    interrupt_checks: int = 0
    free_memory_calls: list[tuple[int, torch.device]] = field(default_factory=list)
    # Every load_models_gpu call: (patchers, memory_required, force_full_load).
    load_requests: list[tuple[tuple[Any, ...], int, bool]] = field(default_factory=list)
    loads: list[Any] = field(default_factory=list)  # patchers that had to be loaded (were not resident)
    loaded: list[Any] = field(default_factory=list)  # resident patchers, most recently used first
    soft_empty_cache_calls: int = 0
    progress: list[tuple[int, int]] = field(default_factory=list)
    progress_bars: int = 0
    folder_names_and_paths: dict[str, tuple[list[str], Any]] = field(default_factory=dict)

    def reset_records(self) -> None:
        self.free_memory_calls.clear()
        self.load_requests.clear()
        self.loads.clear()
        self.progress.clear()
        self.progress_bars = 0
        self.soft_empty_cache_calls = 0
        self.interrupt_checks = 0
        self.interrupt_after_checks = None
        self.interrupt_requested = False


def _model_management(stub: ComfyStub) -> types.ModuleType:
    module = types.ModuleType("comfy.model_management")
    module.InterruptProcessingException = InterruptProcessingException
    module.OOM_EXCEPTION = torch.OutOfMemoryError

    def throw_exception_if_processing_interrupted() -> None:
        stub.interrupt_checks += 1
        due = stub.interrupt_after_checks is not None and stub.interrupt_checks >= stub.interrupt_after_checks
        if stub.interrupt_requested or due:
            stub.interrupt_requested = False
            stub.interrupt_after_checks = None
            raise InterruptProcessingException()

    def free_memory(memory_required: float, device: torch.device, keep_loaded: Any = ()) -> list:
        stub.free_memory_calls.append((int(memory_required), device))
        return []

    def soft_empty_cache(force: bool = False) -> None:
        stub.soft_empty_cache_calls += 1

    def unet_dtype(device: Any = None, model_params: int = 0, supported_dtypes: Any = None, weight_dtype: Any = None):
        return stub.unet_dtype

    def load_models_gpu(
        models: list,
        memory_required: float = 0,
        force_patch_weights: bool = False,
        minimum_memory_required=None,
        force_full_load: bool = False,
    ) -> None:
        stub.load_requests.append((tuple(models), int(memory_required), force_full_load))
        for patcher in models:
            if patcher in stub.loaded:
                stub.loaded.remove(patcher)
            else:
                patcher.model.to(patcher.load_device)
                stub.loads.append(patcher)
            stub.loaded.insert(0, patcher)

    def unload_all_models() -> None:
        for patcher in stub.loaded:
            patcher.model.to(patcher.offload_device)
        stub.loaded.clear()

    module.get_torch_device = lambda: stub.torch_device
    module.unet_offload_device = lambda: stub.offload_device
    module.vae_device = lambda: stub.torch_device
    module.vae_offload_device = lambda: stub.offload_device
    module.intermediate_device = lambda: stub.intermediate_device
    module.get_free_memory = lambda dev=None, torch_free_too=False: stub.free_memory_bytes
    module.load_models_gpu = load_models_gpu
    module.unload_all_models = unload_all_models
    module.current_loaded_models = stub.loaded
    module.free_memory = free_memory
    module.soft_empty_cache = soft_empty_cache
    module.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    module.processing_interrupted = lambda: stub.interrupt_requested
    module.unet_dtype = unet_dtype
    return module


def _model_patcher() -> types.ModuleType:
    module = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size: int = 0, weight_inplace_update: bool = False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.size = size or sum(tensor.nbytes for tensor in model.state_dict().values())

        def model_size(self) -> int:
            return self.size

    module.ModelPatcher = ModelPatcher
    return module


def _ops() -> types.ModuleType:
    """``comfy.ops.disable_weight_init``: torch's layers with ComfyUI's cast flag, which is off here."""
    module = types.ModuleType("comfy.ops")
    layers = {}
    for layer in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
        attributes = {"comfy_cast_weights": False, "weight_function": [], "bias_function": []}
        layers[layer.__name__] = type(layer.__name__, (layer,), attributes)
    module.disable_weight_init = type("disable_weight_init", (), layers)
    return module


def _utils(stub: ComfyStub) -> types.ModuleType:
    module = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total: int, node_id: Any = None) -> None:
            self.total = total
            self.current = 0
            stub.progress_bars += 1

        def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            stub.progress.append((self.current, self.total))

        def update(self, value: int) -> None:
            self.update_absolute(self.current + value)

    module.ProgressBar = ProgressBar
    return module


def _folder_paths(stub: ComfyStub) -> types.ModuleType:
    """The parts of ComfyUI's ``folder_paths`` the pack uses, with ComfyUI's semantics."""
    module = types.ModuleType("folder_paths")
    module.models_dir = str(stub.models_dir)
    names = stub.folder_names_and_paths
    names["checkpoints"] = ([str(stub.models_dir / "checkpoints")], {".ckpt", ".safetensors", ".pt", ".pth"})
    names["diffusers"] = ([str(stub.models_dir / "diffusers")], ["folder"])
    module.folder_names_and_paths = names

    def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
        if folder_name not in names:
            names[folder_name] = ([full_folder_path], set())
            return
        paths = names[folder_name][0]
        if full_folder_path in paths and is_default:
            paths.remove(full_folder_path)
        if full_folder_path not in paths:
            if is_default:
                paths.insert(0, full_folder_path)
            else:
                paths.append(full_folder_path)

    def get_folder_paths(folder_name: str) -> list[str]:
        return list(names[folder_name][0])

    def get_filename_list(folder_name: str) -> list[str]:
        paths, extensions = names[folder_name]
        found: set[str] = set()
        for folder in paths:
            for root, _dirs, files in os.walk(folder, followlinks=True):
                for file_name in files:
                    relative = os.path.relpath(os.path.join(root, file_name), folder)
                    if not extensions or os.path.splitext(file_name)[1].lower() in extensions:
                        found.add(relative)
        return sorted(found)

    def get_full_path(folder_name: str, filename: str) -> str | None:
        if folder_name not in names:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for folder in names[folder_name][0]:
            candidate = os.path.join(folder, filename)
            if os.path.isfile(candidate):
                return candidate
        return None

    def get_full_path_or_raise(folder_name: str, filename: str) -> str:
        path = get_full_path(folder_name, filename)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return path

    module.add_model_folder_path = add_model_folder_path
    module.get_folder_paths = get_folder_paths
    module.get_filename_list = get_filename_list
    module.get_full_path = get_full_path
    module.get_full_path_or_raise = get_full_path_or_raise
    return module


def install_comfy_stubs(models_dir: Path) -> ComfyStub:
    """Put the stand-in modules into ``sys.modules`` (refuses if real ComfyUI modules are loaded)."""
    for name in STUB_MODULES:
        if name in sys.modules and not getattr(sys.modules[name], "__comfy_stub__", False):
            raise RuntimeError(f"a real {name} module is already imported; the stubs would shadow it")
    stub = ComfyStub(models_dir=Path(models_dir))
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, so "import comfy.utils" works
    modules = {
        "comfy": comfy,
        "comfy.model_management": _model_management(stub),
        "comfy.model_patcher": _model_patcher(),
        "comfy.ops": _ops(),
        "comfy.utils": _utils(stub),
        "folder_paths": _folder_paths(stub),
        **build_comfy_api_modules(),
    }
    for name in ("model_management", "model_patcher", "ops", "utils"):
        setattr(comfy, name, modules[f"comfy.{name}"])
    for name, module in modules.items():
        module.__comfy_stub__ = True
        sys.modules[name] = module
    return stub


def pack_module_name(pack_root: Path) -> str:
    """The name ComfyUI gives a custom-node folder's module: its path with dots replaced."""
    return str(pack_root).replace(".", "_x_")


def import_pack(pack_root: Path) -> types.ModuleType:
    """Import ``pack_root/__init__.py`` as ComfyUI's ``load_custom_node`` does."""
    name = pack_module_name(pack_root)
    spec = importlib.util.spec_from_file_location(name, os.path.join(pack_root, "__init__.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def node_classes(pack: types.ModuleType) -> dict[str, type]:
    """node id -> node class, asked of the pack's ``comfy_entrypoint`` as ComfyUI asks it."""
    extension = asyncio.run(pack.comfy_entrypoint())
    return {node.GET_SCHEMA().node_id: node for node in asyncio.run(extension.get_node_list())}


def remove_from_sys_modules(pack_root: Path) -> None:
    """Forget the stubs and the pack's modules."""
    prefix = pack_module_name(pack_root)
    for name in list(sys.modules):
        if name in STUB_MODULES or name == prefix or name.startswith(prefix + "."):
            del sys.modules[name]
