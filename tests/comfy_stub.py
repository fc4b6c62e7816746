"""Stand-ins for the ComfyUI modules the pack imports, for tests without ComfyUI (CI cannot install it):
``install_comfy_stubs`` puts ``comfy.*``, ``folder_paths`` and the V3 API ``comfy_api.v0_0_2`` into ``sys.modules``
(as ComfyUI behaves with ``--cpu``) and returns a ``ComfyStub`` recording what the nodes ask; what they declare is
checked against ``node_interface.json``.  ``import_pack`` imports the repository as ComfyUI imports a node folder.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

STUB_MODULES = ("comfy", "comfy.model_management", "comfy.model_patcher", "comfy.ops", "comfy.utils")
STUB_MODULES += ("folder_paths", "comfy_api", "comfy_api.v0_0_2")


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
    load_requests: list[tuple[tuple[Any, ...], int, bool]] = field(default_factory=list)  # every load_models_gpu
    loads: list[Any] = field(default_factory=list)  # patchers that had to be loaded (were not resident)
    loaded: list[Any] = field(default_factory=list)  # resident patchers, most recently used first
    soft_empty_cache_calls: int = 0
    progress: list[tuple[int, int]] = field(default_factory=list)
    progress_bars: int = 0
    folder_names_and_paths: dict[str, tuple[list[str], Any]] = field(default_factory=dict)

    def reset_records(self) -> None:
        del self.load_requests[:], self.loads[:], self.progress[:]
        self.progress_bars = self.soft_empty_cache_calls = self.interrupt_checks = 0
        self.interrupt_after_checks, self.interrupt_requested = None, False

    def check_interrupt(self) -> None:  # throw_exception_if_processing_interrupted
        self.interrupt_checks += 1
        due = self.interrupt_after_checks is not None and self.interrupt_checks >= self.interrupt_after_checks
        if self.interrupt_requested or due:
            self.interrupt_requested, self.interrupt_after_checks = False, None
            raise InterruptProcessingException()

    def load_models_gpu(self, models, memory_required=0, force_patch_weights=False, force_full_load=False, **_):
        self.load_requests.append((tuple(models), int(memory_required), force_full_load))
        for patcher in models:  # a patcher asked for again stays loaded, as in ComfyUI
            if patcher in self.loaded:
                self.loaded.remove(patcher)
            else:
                patcher.model.to(patcher.load_device)
                self.loads.append(patcher)
            self.loaded.insert(0, patcher)

    def soft_empty_cache(self, force: bool = False) -> None:
        self.soft_empty_cache_calls += 1

    def unload_all_models(self) -> None:  # what "Unload models" calls
        for patcher in self.loaded:
            patcher.model.to(patcher.offload_device)
        self.loaded.clear()

    def get_filename_list(self, folder_name: str) -> list[str]:
        paths, extensions = self.folder_names_and_paths[folder_name]
        found = set()
        for folder in paths:
            for root, _dirs, files in os.walk(folder, followlinks=True):
                for name in files:
                    if not extensions or os.path.splitext(name)[1].lower() in extensions:
                        found.add(os.path.relpath(os.path.join(root, name), folder))
        return sorted(found)

    def add_model_folder_path(self, folder_name: str, path: str, is_default: bool = False) -> None:
        paths = self.folder_names_and_paths.setdefault(folder_name, ([], set()))[0]
        paths.insert(0 if is_default else len(paths), path) if path not in paths else None

    def get_full_path(self, folder_name: str, filename: str) -> str | None:
        filename = os.path.relpath(os.path.join("/", filename), "/")  # no way out of the folder
        folders = self.folder_names_and_paths.get(folder_name, ([],))[0]
        return next((path for path in (os.path.join(f, filename) for f in folders) if os.path.isfile(path)), None)


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size: int = 0, weight_inplace_update: bool = False):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.size = size or sum(tensor.nbytes for tensor in model.state_dict().values())

    def model_size(self) -> int:
        return self.size


def _progress_bar(stub: ComfyStub) -> type:
    class ProgressBar:
        def __init__(self, total: int, node_id: Any = None) -> None:
            self.total = total
            stub.progress_bars += 1

        def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
            self.total = self.total if total is None else total
            stub.progress.append((min(value, self.total), self.total))

    return ProgressBar


# Only keywords that ComfyUI 0.3.64 (the oldest supported) accepts and this stand-in describes; others raise.
_KEYWORDS = {"display_name", "optional", "tooltip", "lazy"}
_NUMBER_KEYWORDS = {"default", "min", "max", "step", "socketless"}
_WIDGET_KEYWORDS = {"INT": _NUMBER_KEYWORDS | {"control_after_generate"}, "FLOAT": _NUMBER_KEYWORDS | {"round"}}
_WIDGET_KEYWORDS["COMBO"] = {"default", "options", "control_after_generate", "socketless"}


def _input(io_type: str, id: str, options: list | None = None, **keywords: Any) -> types.SimpleNamespace:
    keywords |= {"options": options} if options is not None else {}
    unknown = set(keywords) - _KEYWORDS - _WIDGET_KEYWORDS.get(io_type, set())
    if unknown:
        raise TypeError(f"{io_type} input {id!r}: the stand-in does not take {sorted(unknown)}")
    optional = keywords.pop("optional", False)
    options = {key: value for key, value in keywords.items() if value is not None}
    return types.SimpleNamespace(io_type=io_type, id=id, optional=optional, options=options)


def _output(io_type: str, id=None, display_name=None, tooltip=None, is_output_list=False) -> types.SimpleNamespace:
    return types.SimpleNamespace(**locals())


def Custom(io_type: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(Input=functools.partial(_input, io_type), Output=functools.partial(_output, io_type))


def Schema(node_id, display_name=None, category="sd", inputs=(), outputs=(), description="", is_output_node=False):
    return types.SimpleNamespace(**locals())


class ComfyNode:
    @classmethod
    def GET_SCHEMA(cls) -> types.SimpleNamespace:
        schema = cls.define_schema()
        for index, output in enumerate(schema.outputs):
            output.id = output.id or f"_{index}_{output.io_type}_"
        ids = [item.id for item in [*schema.inputs, *schema.outputs]]  # ComfyUI 0.3.x: unique across both
        assert len(set(ids)) == len(ids), f"{schema.node_id}: ids must be unique between inputs and outputs: {ids}"
        return schema

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict[str, Any]:
        """The node as ``GET /object_info`` serves it (the fields the tests read)."""
        schema, inputs = cls.GET_SCHEMA(), {"required": {}}
        for item in schema.inputs:
            inputs.setdefault("optional" if item.optional else "required", {})[item.id] = [item.io_type, item.options]
        info = {"display_name": schema.display_name, "description": schema.description, "category": schema.category}
        info |= {"output_node": schema.is_output_node, "input": inputs}
        info["input_order"] = {section: list(specs) for section, specs in inputs.items()}
        outputs = schema.outputs
        info |= {"output": [o.io_type for o in outputs], "output_name": [o.display_name or o.io_type for o in outputs]}
        info |= {"output_is_list": [o.is_output_list for o in outputs], "output_tooltips": [o.tooltip for o in outputs]}
        return info


ComfyExtension = type("ComfyExtension", (), {})  # what comfy_entrypoint returns; ComfyUI asks its get_node_list


def NodeOutput(*args: Any, ui: Any = None) -> types.SimpleNamespace:
    return types.SimpleNamespace(result=args or None, ui=ui)


def PreviewText(value: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(as_dict=lambda: {"text": (value,)})


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes, __comfy_stub__=True, __path__=[])  # a package: "import comfy.utils" works
    return module


def install_comfy_stubs(models_dir: Path) -> ComfyStub:
    """Put the stand-in modules into ``sys.modules`` (refuses if real ComfyUI modules are loaded)."""
    for name in STUB_MODULES:
        if name in sys.modules and not getattr(sys.modules[name], "__comfy_stub__", False):
            raise RuntimeError(f"a real {name} module is already imported; the stubs would shadow it")
    stub = ComfyStub(models_dir=Path(models_dir))
    management = _module("comfy.model_management", InterruptProcessingException=InterruptProcessingException)
    management.OOM_EXCEPTION, management.current_loaded_models = torch.OutOfMemoryError, stub.loaded
    management.get_torch_device = management.vae_device = lambda: stub.torch_device
    management.unet_offload_device = management.vae_offload_device = lambda: stub.offload_device
    management.intermediate_device = lambda: stub.intermediate_device
    management.get_free_memory = lambda device=None, torch_free_too=False: stub.free_memory_bytes
    management.unet_dtype = lambda device=None, supported_dtypes=None, **_: stub.unet_dtype
    management.load_models_gpu, management.unload_all_models = stub.load_models_gpu, stub.unload_all_models
    management.soft_empty_cache = stub.soft_empty_cache
    management.throw_exception_if_processing_interrupted = stub.check_interrupt
    management.processing_interrupted = lambda: stub.interrupt_requested
    cast_flags = {"comfy_cast_weights": False, "weight_function": [], "bias_function": []}  # casting is off here
    layers = {
        kind.__name__: type(kind.__name__, (kind,), cast_flags)
        for kind in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
    }
    comfy = {
        "model_management": management,
        "model_patcher": _module("comfy.model_patcher", ModelPatcher=ModelPatcher),
        "ops": _module("comfy.ops", disable_weight_init=type("disable_weight_init", (), layers)),
        "utils": _module("comfy.utils", ProgressBar=_progress_bar(stub)),
    }
    names = stub.folder_names_and_paths
    names["checkpoints"] = ([str(stub.models_dir / "checkpoints")], {".ckpt", ".safetensors", ".pt", ".pth"})
    names["diffusers"] = ([str(stub.models_dir / "diffusers")], ["folder"])
    folder_paths = _module("folder_paths", models_dir=str(stub.models_dir), folder_names_and_paths=names)
    folder_paths.get_folder_paths = lambda folder_name: list(names[folder_name][0])
    folder_paths.get_filename_list, folder_paths.get_full_path = stub.get_filename_list, stub.get_full_path
    folder_paths.add_model_folder_path = stub.add_model_folder_path
    io = _module("comfy_api.v0_0_2.io", Schema=Schema, ComfyNode=ComfyNode, NodeOutput=NodeOutput, Custom=Custom)
    for kind in ("INT", "FLOAT", "COMBO", "IMAGE", "LATENT", "CONDITIONING", "MODEL", "CLIP", "VAE"):
        setattr(io, kind.title(), Custom(kind))
    ui = _module("comfy_api.v0_0_2.ui", PreviewText=PreviewText)
    api = _module("comfy_api.v0_0_2", io=io, ui=ui, ComfyExtension=ComfyExtension)
    sys.modules.update({f"comfy.{name}": module for name, module in comfy.items()}, comfy=_module("comfy", **comfy))
    sys.modules.update(folder_paths=folder_paths, comfy_api=_module("comfy_api", v0_0_2=api))
    sys.modules["comfy_api.v0_0_2"] = api
    return stub


def pack_module_name(pack_root: Path) -> str:
    """The name ComfyUI gives a custom-node folder's module: its path with dots replaced."""
    return str(pack_root).replace(".", "_x_")


def import_pack(pack_root: Path) -> types.ModuleType:
    """Import ``pack_root/__init__.py`` as ComfyUI's ``load_custom_node`` does (by file path)."""
    spec = importlib.util.spec_from_file_location(pack_module_name(pack_root), os.path.join(pack_root, "__init__.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
