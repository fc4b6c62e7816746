"""Static validation of UI-format ComfyUI workflows against node definitions.

Node definitions use the layout of ComfyUI's ``GET /object_info``: the pack's
nodes are described from their classes (``node_info``, as ComfyUI's server
does for V1 and V3 nodes), ComfyUI's core nodes come from a recorded fixture.

``validate_workflow`` returns a list of problems (empty = valid):

* every node type exists (frontend-only nodes such as Note are allowed);
* ``widgets_values`` holds one value per widget input, in input order, plus the
  frontend's extra value for seed controls and image-upload buttons (trailing
  optional widgets may be missing: a workflow saved before they were appended
  loads with their defaults), and every
  value fits its type, range or combo list (file lists are machine-specific, so
  file combos are checked by a caller-supplied rule instead);
* inputs and outputs listed on the node match the definition;
* links join an output to an input of the same type, and the nodes' own link
  bookkeeping agrees with the ``links`` table;
* required inputs without a widget are connected.

``api_prompt`` turns a valid UI-format workflow into the API format the frontend sends to ``POST /prompt``
(``{id: {class_type, inputs}}``, a link as ``[origin id, output slot]``), for running it with stand-ins.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "VIRTUAL_NODE_TYPES",
    "WIDGET_TYPES",
    "SEED_CONTROL_VALUES",
    "node_info",
    "load_core_definitions",
    "widget_slots",
    "validate_workflow",
    "api_prompt",
]

# Frontend-only nodes: saved in workflows, never sent to the server.
VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
_SEED_NAMES = ("seed", "noise_seed")

FileRule = Callable[[Any], bool]


def node_info(node_id: str, node_class: type, display_name: str = "") -> dict[str, Any]:
    """A node class described as ``GET /object_info/<node_id>`` describes it (V3 nodes describe themselves)."""
    if hasattr(node_class, "GET_NODE_INFO_V1"):
        return node_class.GET_NODE_INFO_V1()
    inputs = node_class.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {section: list(values) for section, values in inputs.items()},
        "output": list(node_class.RETURN_TYPES),
        "output_is_list": list(getattr(node_class, "OUTPUT_IS_LIST", [False] * len(node_class.RETURN_TYPES))),
        "output_name": list(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES)),
        "name": node_id,
        "display_name": display_name,
        "description": getattr(node_class, "DESCRIPTION", ""),
        "category": getattr(node_class, "CATEGORY", "sd"),
        "output_node": bool(getattr(node_class, "OUTPUT_NODE", False)),
        "output_tooltips": list(getattr(node_class, "OUTPUT_TOOLTIPS", [])),
    }


def load_core_definitions(path: Path) -> dict[str, dict[str, Any]]:
    """The recorded ``/object_info`` entries of ComfyUI core nodes (the fixture's ``nodes``)."""
    return json.loads(Path(path).read_text())["nodes"]


def _input_kind(spec: list | tuple) -> str:
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return "COMBO"
    return str(kind)


def _options(spec: list | tuple) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _combo_values(spec: list | tuple) -> list[Any]:
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    return list(_options(spec).get("options", []))


def widget_slots(definition: Mapping[str, Any]) -> list[tuple[str, str, list | tuple]]:
    """``(input name, role, spec)`` per entry of ``widgets_values``; role is value, seed_control or upload."""
    slots: list[tuple[str, str, list | tuple]] = []
    for section in ("required", "optional"):
        specs = definition["input"].get(section, {})
        for name in definition.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            kind, options = _input_kind(spec), _options(spec)
            if kind not in WIDGET_TYPES or options.get("forceInput"):
                continue
            slots.append((name, "value", spec))
            control = options.get("control_after_generate")
            if kind == "INT" and (control if control is not None else name in _SEED_NAMES):
                slots.append((name, "seed_control", spec))
            if options.get("image_upload"):
                slots.append((name, "upload", spec))
    return slots


def _check_value(name: str, spec: list | tuple, value: Any, file_rule: FileRule | None) -> str | None:
    kind, options = _input_kind(spec), _options(spec)
    if kind == "COMBO":
        if file_rule is not None:
            return None if file_rule(value) else f"{name}={value!r} is not an acceptable file name"
        choices = _combo_values(spec)
        return None if value in choices else f"{name}={value!r} is not one of {choices}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name}={value!r} is not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{name}={value!r} is not a number"
    low, high = options.get("min"), options.get("max")
    if low is not None and value < low:
        return f"{name}={value!r} is below the minimum {low}"
    if high is not None and value > high:
        return f"{name}={value!r} is above the maximum {high}"
    return None


def _check_widgets(
    node: Mapping[str, Any], definition: Mapping[str, Any], file_rules: Mapping[tuple[str, str], FileRule]
) -> list[str]:
    label = f"node {node.get('id')} ({node.get('type')})"
    slots = widget_slots(definition)
    values = node.get("widgets_values", [])
    if not isinstance(values, list):
        return [f"{label}: widgets_values must be a list, got {type(values).__name__}"]
    optional = set(definition["input"].get("optional", {}))
    # A workflow saved before optional widgets were appended lacks their values: the frontend keeps the defaults.
    missing = slots[len(values) :]
    if len(values) > len(slots) or any(name not in optional for name, _, _ in missing):
        expected = [f"{name}:{role}" for name, role, _ in slots]
        return [f"{label}: {len(values)} widgets_values but the widgets are {expected}"]
    problems = []
    for (name, role, spec), value in zip(slots, values, strict=False):
        if role == "seed_control":
            if value not in SEED_CONTROL_VALUES:
                problems.append(f"{label}: control after generate of {name} is {value!r}")
        elif role == "value":
            problem = _check_value(name, spec, value, file_rules.get((node["type"], name)))
            if problem:
                problems.append(f"{label}: {problem}")
    return problems


def _definition_inputs(definition: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """input name -> (type, required)."""
    found = {}
    for section in ("required", "optional"):
        for name, spec in definition["input"].get(section, {}).items():
            found[name] = (_input_kind(spec), section == "required")
    return found


def _types_match(output_type: str, input_type: str) -> bool:
    return output_type == input_type or "*" in (output_type, input_type)


def _check_node_sockets(node: Mapping[str, Any], definition: Mapping[str, Any], links: Mapping[int, list]) -> list[str]:
    label = f"node {node.get('id')} ({node.get('type')})"
    problems = []
    expected_inputs = _definition_inputs(definition)
    connected = set()
    has_upload_button = any(role == "upload" for _, role, _ in widget_slots(definition))
    for slot, socket in enumerate(node.get("inputs", [])):
        name = socket.get("name")
        if has_upload_button and name == "upload" and socket.get("type") == "IMAGEUPLOAD":
            continue  # the frontend's upload button, listed as a widget input
        if name not in expected_inputs:
            problems.append(f"{label}: input {name!r} is not an input of {node['type']}")
            continue
        expected_type = expected_inputs[name][0]
        if not _types_match(socket.get("type"), expected_type):
            problems.append(f"{label}: input {name!r} has type {socket.get('type')!r}, expected {expected_type!r}")
        link_id = socket.get("link")
        if link_id is None:
            continue
        link = links.get(link_id)
        if link is None:
            problems.append(f"{label}: input {name!r} refers to missing link {link_id}")
        elif link[3] != node["id"] or link[4] != slot:
            problems.append(f"{label}: link {link_id} does not end at input {name!r} (slot {slot})")
        else:
            connected.add(name)
    for name, (kind, required) in expected_inputs.items():
        if required and kind not in WIDGET_TYPES and name not in connected:
            problems.append(f"{label}: required input {name!r} ({kind}) is not connected")
    outputs = node.get("outputs", [])
    if len(outputs) != len(definition["output"]):
        problems.append(f"{label}: {len(outputs)} outputs, expected {len(definition['output'])}")
    for slot, (socket, expected_type) in enumerate(zip(outputs, definition["output"], strict=False)):
        if socket.get("type") != expected_type:
            problems.append(f"{label}: output {slot} has type {socket.get('type')!r}, expected {expected_type!r}")
        for link_id in socket.get("links") or []:
            link = links.get(link_id)
            if link is None or link[1] != node["id"] or link[2] != slot:
                problems.append(f"{label}: output {slot} lists link {link_id}, which does not start there")
    return problems


def _check_links(nodes: Mapping[int, Mapping[str, Any]], links: Mapping[int, list]) -> list[str]:
    problems = []
    for link_id, link in links.items():
        _, origin_id, origin_slot, target_id, target_slot, link_type = link
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None or target is None:
            problems.append(f"link {link_id}: joins missing node {origin_id if origin is None else target_id}")
            continue
        outputs, inputs = origin.get("outputs", []), target.get("inputs", [])
        if origin_slot >= len(outputs) or target_slot >= len(inputs):
            problems.append(f"link {link_id}: slot out of range ({origin_slot} -> {target_slot})")
            continue
        output_type, input_socket = outputs[origin_slot].get("type"), inputs[target_slot]
        if input_socket.get("link") != link_id:
            problems.append(f"link {link_id}: input {input_socket.get('name')!r} of node {target_id} does not hold it")
        if link_id not in (outputs[origin_slot].get("links") or []):
            problems.append(f"link {link_id}: output {origin_slot} of node {origin_id} does not list it")
        if not _types_match(output_type, input_socket.get("type")):
            problems.append(
                f"link {link_id}: {output_type} output of node {origin_id} into {input_socket.get('type')} "
                f"input {input_socket.get('name')!r} of node {target_id}"
            )
        if link_type not in (output_type, "*"):
            problems.append(f"link {link_id}: declared type {link_type!r} but the output is {output_type!r}")
    return problems


def validate_workflow(
    workflow: Mapping[str, Any],
    definitions: Mapping[str, Mapping[str, Any]],
    *,
    file_rules: Mapping[tuple[str, str], FileRule] | None = None,
) -> list[str]:
    """Every problem found in a UI-format ``workflow`` (see the module docstring)."""
    file_rules = file_rules or {}
    problems: list[str] = []
    if not isinstance(workflow.get("nodes"), list) or not isinstance(workflow.get("links"), list):
        return ["not a UI-format workflow (needs 'nodes' and 'links' lists)"]
    nodes: dict[int, Mapping[str, Any]] = {}
    for node in workflow["nodes"]:
        if node.get("id") in nodes:
            problems.append(f"node id {node.get('id')} is used twice")
        nodes[node.get("id")] = node
    links: dict[int, list] = {}
    for link in workflow["links"]:
        if not isinstance(link, list) or len(link) != 6:
            problems.append(f"link {link!r} is not [id, from, from_slot, to, to_slot, type]")
            continue
        links[link[0]] = link
    if nodes and workflow.get("last_node_id", 0) < max(nodes):
        problems.append("last_node_id is smaller than a node id")
    if links and workflow.get("last_link_id", 0) < max(links):
        problems.append("last_link_id is smaller than a link id")
    for node in nodes.values():
        node_type = node.get("type")
        if node_type in VIRTUAL_NODE_TYPES:
            continue
        definition = definitions.get(node_type)
        if definition is None:
            problems.append(f"node {node.get('id')}: unknown node type {node_type!r}")
            continue
        problems += _check_widgets(node, definition, file_rules)
        problems += _check_node_sockets(node, definition, links)
    problems += _check_links(nodes, links)
    return problems


def api_prompt(workflow: Mapping[str, Any], definitions: Mapping[str, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """``{node id: {"class_type", "inputs"}}`` of the nodes that run (not notes, not bypassed or muted ones)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[int, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODE_TYPES or node.get("mode", 0) in (2, 4):
            continue
        slots = widget_slots(definitions[node["type"]])
        values = node.get("widgets_values", [])
        inputs = {name: value for (name, role, _), value in zip(slots, values, strict=False) if role == "value"}
        for socket in node.get("inputs", []):
            link = links.get(socket.get("link"))
            if link is not None:
                inputs[socket["name"]] = [link[1], link[2]]
        prompt[node["id"]] = {"class_type": node["type"], "inputs": inputs}
    return prompt
