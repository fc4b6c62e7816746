"""The shipped workflows as graphs: where they are, the node interfaces they are checked against, and lookups.

Node interfaces (``node_interface.py``): the pack's nodes as pinned in ``node_interface.json`` (which the
nodes are checked against in ``test_nodes.py``), ComfyUI's core nodes read from ``/object_info`` entries
recorded from a real ComfyUI (``fixtures/comfy_core_nodes.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from node_interface import interface_of, load_snapshot
from workflow_validation import widget_slots

__all__ = [
    "WORKFLOWS_DIR",
    "WORKFLOWS",
    "CORE_FIXTURE",
    "FILE_RULES",
    "interfaces",
    "load_workflow",
    "node_types",
    "nodes_of_type",
    "source_node",
    "widget_value",
]

WORKFLOWS_DIR = Path(__file__).resolve().parents[1] / "workflows"
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json"))
CORE_FIXTURE = Path(__file__).parent / "fixtures" / "comfy_core_nodes.json"

# Model-file combos list whatever is on the machine: check the form of the value instead.
FILE_RULES = {
    ("FiDeSRModelLoader", "base_model"): lambda value: (
        isinstance(value, str) and value.startswith(("diffusers/", "checkpoints/"))
    ),
    ("FiDeSRModelLoader", "fidesr_weights"): lambda value: (
        isinstance(value, str) and value.endswith((".pkl", ".safetensors"))
    ),
    ("FiDeSRModelFromCheckpoint", "fidesr_weights"): lambda value: (
        isinstance(value, str) and value.endswith((".pkl", ".safetensors"))
    ),
    ("CheckpointLoaderSimple", "ckpt_name"): lambda value: isinstance(value, str) and value.endswith(".safetensors"),
    ("LoadImage", "image"): lambda value: isinstance(value, str) and bool(value),
}


def interfaces() -> dict[str, dict[str, Any]]:
    """The interfaces of the pack's nodes (pinned) and of ComfyUI's recorded core nodes."""
    core = {
        node_id: interface_of(node_id, info) for node_id, info in json.loads(CORE_FIXTURE.read_text())["nodes"].items()
    }
    ours = load_snapshot()
    assert not set(ours) & set(core)
    return core | ours


def load_workflow(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def node_types(workflow: Mapping[str, Any]) -> list[str]:
    return [node["type"] for node in workflow["nodes"]]


def nodes_of_type(workflow: Mapping[str, Any], node_type: str) -> list[dict[str, Any]]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def source_node(workflow: Mapping[str, Any], node: Mapping[str, Any], input_name: str) -> dict[str, Any] | None:
    """The node feeding ``input_name`` of ``node``."""
    socket = next((s for s in node["inputs"] if s["name"] == input_name), None)
    if socket is None or socket.get("link") is None:
        return None
    link = next(link for link in workflow["links"] if link[0] == socket["link"])
    return next(n for n in workflow["nodes"] if n["id"] == link[1])


def widget_value(definitions: Mapping[str, Any], node: Mapping[str, Any], name: str) -> Any:
    slots = widget_slots(definitions[node["type"]])
    index = next(i for i, (slot_name, role, _) in enumerate(slots) if slot_name == name and role == "value")
    return node["widgets_values"][index]
