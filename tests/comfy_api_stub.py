"""A stand-in for the part of ComfyUI's V3 node API (``comfy_api.v0_0_2``) the pack uses, for tests without ComfyUI.

It mirrors ComfyUI 0.8.0's ``comfy_api.latest._io`` for these pieces: ``io.ComfyNode`` (``GET_SCHEMA``,
``GET_NODE_INFO_V1``, ``INPUT_TYPES``), ``io.Schema``, the ``Int``/``Float``/``Combo``/``Image``/``Latent``/
``Conditioning`` types, ``io.Custom``, ``io.NodeOutput``, ``ComfyExtension`` and ``ui.PreviewText``.  ``GET_NODE_INFO_V1`` gives what
ComfyUI's ``GET /object_info`` serves for a V3 node; the test that runs in a real ComfyUI
(``test_nodes_real_comfyui.py``) checks that the two agree for every node of the pack.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

__all__ = ["build_comfy_api_modules"]


def _prune(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class Input:
    io_type: str = ""

    def __init__(
        self,
        id: str,  # noqa: A002 - ComfyUI's parameter name
        display_name: str | None = None,
        optional: bool = False,
        tooltip: str | None = None,
        lazy: bool | None = None,
        extra_dict: dict | None = None,
        raw_link: bool | None = None,
    ) -> None:
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy
        self.extra_dict, self.raw_link = extra_dict or {}, raw_link

    def as_dict(self) -> dict[str, Any]:
        own = {
            "display_name": self.display_name,
            "optional": self.optional,
            "tooltip": self.tooltip,
            "lazy": self.lazy,
            "rawLink": self.raw_link,
        }
        return _prune(own) | _prune(self.extra_dict)


class WidgetInput(Input):
    def __init__(self, id: str, *, default: Any = None, socketless: bool | None = None, **kwargs: Any) -> None:  # noqa: A002
        super().__init__(id, **kwargs)
        self.default, self.socketless = default, socketless

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | _prune({"default": self.default, "socketless": self.socketless})


class Output:
    io_type: str = ""

    def __init__(
        self,
        id: str | None = None,  # noqa: A002
        display_name: str | None = None,
        tooltip: str | None = None,
        is_output_list: bool = False,
    ) -> None:
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name or id, tooltip, is_output_list


def _comfy_type(io_type: str, input_class: type[Input] = Input) -> type:
    bound_input = type("Input", (input_class,), {"io_type": io_type})
    bound_output = type("Output", (Output,), {"io_type": io_type})
    return type(io_type.title(), (), {"io_type": io_type, "Input": bound_input, "Output": bound_output})


class _IntInput(WidgetInput):
    def __init__(self, id: str, *, min=None, max=None, step=None, control_after_generate=None, **kwargs) -> None:  # noqa: A002
        super().__init__(id, **kwargs)
        self.min, self.max, self.step, self.control_after_generate = min, max, step, control_after_generate

    def as_dict(self) -> dict[str, Any]:
        extra = {"min": self.min, "max": self.max, "step": self.step}
        return super().as_dict() | _prune(extra | {"control_after_generate": self.control_after_generate})


class _FloatInput(WidgetInput):
    def __init__(self, id: str, *, min=None, max=None, step=None, round=None, **kwargs) -> None:  # noqa: A002
        super().__init__(id, **kwargs)
        self.min, self.max, self.step, self.round = min, max, step, round

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | _prune({"min": self.min, "max": self.max, "step": self.step, "round": self.round})


class _ComboInput(WidgetInput):
    def __init__(self, id: str, options: list | None = None, **kwargs: Any) -> None:  # noqa: A002
        super().__init__(id, **kwargs)
        self.options = options

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | _prune({"multiselect": False, "options": self.options})


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False

    def finalize(self) -> None:
        for index, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{index}_{output.io_type}_"

    def validate(self) -> None:
        # ComfyUI 0.3.x wants ids unique across inputs and outputs together (0.8 only within each).
        ids = [item.id for item in self.inputs] + [output.id for output in self.outputs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.node_id}: ids must be unique between inputs and outputs, got {ids}")

    def v1_info(self, node_class: type) -> dict[str, Any]:
        inputs: dict[str, dict[str, Any]] = {"required": {}}
        for item in self.inputs:
            options = item.as_dict()
            options.pop("optional", None)
            inputs.setdefault("optional" if item.optional else "required", {})[item.id] = (item.io_type, options)
        return {
            "input": inputs,
            "input_order": {key: list(value) for key, value in inputs.items()},
            "output": [o.io_type for o in self.outputs],
            "output_is_list": [o.is_output_list for o in self.outputs],
            "output_name": [o.display_name or o.io_type for o in self.outputs],
            "output_tooltips": [o.tooltip or None for o in self.outputs],
            "output_matchtypes": None,
            "name": self.node_id,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": getattr(node_class, "RELATIVE_PYTHON_MODULE", None) or "nodes",
            "category": self.category,
            "output_node": self.is_output_node,
            "deprecated": False,
            "experimental": False,
            "api_node": False,
        }


class ComfyNode:
    RELATIVE_PYTHON_MODULE: str | None = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        return True

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 - ComfyUI's name
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        return schema

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict[str, Any]:  # noqa: N802
        return cls.GET_SCHEMA().v1_info(cls)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:  # noqa: N802
        return cls.GET_NODE_INFO_V1()["input"]


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: str | None = None) -> None:
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self) -> tuple | None:
        return self.args if self.args else None

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class PreviewText:
    """``ui.PreviewText``: a text a node shows after it ran (``{"text": (value,)}`` in the prompt's outputs)."""

    def __init__(self, value: str, **kwargs: Any) -> None:
        self.value = value

    def as_dict(self) -> dict[str, Any]:
        return {"text": (self.value,)}


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list[type[ComfyNode]]:
        raise NotImplementedError


def Custom(io_type: str) -> type:  # noqa: N802 - ComfyUI's name
    return _comfy_type(io_type)


def build_comfy_api_modules() -> dict[str, types.ModuleType]:
    """``comfy_api`` and ``comfy_api.v0_0_2`` (with ``io``, ``ui`` and ``ComfyExtension``), ready for ``sys.modules``."""
    io = types.ModuleType("comfy_api.v0_0_2.io")
    for name, value in {
        "Input": Input,
        "Output": Output,
        "Schema": Schema,
        "ComfyNode": ComfyNode,
        "NodeOutput": NodeOutput,
        "Custom": Custom,
        "Int": _comfy_type("INT", _IntInput),
        "Float": _comfy_type("FLOAT", _FloatInput),
        "Combo": _comfy_type("COMBO", _ComboInput),
        "Image": _comfy_type("IMAGE"),
        "Latent": _comfy_type("LATENT"),
        "Conditioning": _comfy_type("CONDITIONING"),
    }.items():
        setattr(io, name, value)
    ui = types.ModuleType("comfy_api.v0_0_2.ui")
    ui.PreviewText = PreviewText
    version = types.ModuleType("comfy_api.v0_0_2")
    version.io, version.ui, version.ComfyExtension = io, ui, ComfyExtension
    package = types.ModuleType("comfy_api")
    package.__path__ = []
    package.v0_0_2 = version
    return {"comfy_api": package, "comfy_api.v0_0_2": version}
