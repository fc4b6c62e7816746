"""Static validation of UI-format workflows against node interfaces (``node_interface.py``).

``validate_workflow`` lists a workflow's problems: unknown node types (notes are frontend-only); widget values
not one per widget input in order (plus seed-control and upload-button values; trailing optional ones may be
missing) or not fitting the input's type, range or options (model files: a caller's rule); sockets that are not
the node's, required sockets unlinked; links not held by both ends or joining different types.  ``api_prompt``
converts a valid workflow as the frontend does for such simple graphs, to run it on the stand-ins (a real
ComfyUI gets the real frontend's conversion: ``run_workflow.py --convert-ui``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FRONTEND_ONLY = frozenset({"Note", "MarkdownNote"})
WIDGET_TYPES = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool, "COMBO": object}


def widget_slots(interface: Mapping[str, Any]) -> list[tuple[str, str, dict]]:
    """``(input name, role, input)`` per entry of ``widgets_values``; role is value, seed_control or upload."""
    slots = []
    for item in interface["inputs"]:
        if item["type"] in WIDGET_TYPES and not item.get("forceInput"):
            slots.append((item["name"], "value", item))
            if item["type"] == "INT" and item.get("control_after_generate", item["name"] in ("seed", "noise_seed")):
                slots.append((item["name"], "seed_control", item))
            if item.get("image_upload"):
                slots.append((item["name"], "upload", item))
    return slots


def _value_problem(item: Mapping[str, Any], value: Any, file_rule: Any) -> str | None:
    name, kind = item["name"], item["type"]
    if item.get("files"):
        return None if file_rule is not None and file_rule(value) else f"{name}={value!r} is not a fitting file name"
    if kind == "COMBO":
        return None if value in item["options"] else f"{name}={value!r} is not one of {item['options']}"
    if not isinstance(value, WIDGET_TYPES[kind]) or (isinstance(value, bool) and kind != "BOOLEAN"):
        return f"{name}={value!r} is not {kind}"
    if not item.get("min", value) <= value <= item.get("max", value):
        return f"{name}={value!r} is outside [{item.get('min')}, {item.get('max')}]"
    return None


def _widget_problems(node: Mapping[str, Any], interface: Mapping[str, Any], file_rules: Mapping) -> list[str]:
    slots, values = widget_slots(interface), node.get("widgets_values", [])
    if len(values) > len(slots) or any(not item.get("optional") for _, _, item in slots[len(values) :]):
        return [f"{len(values)} widgets_values but the widgets are {[f'{name}:{role}' for name, role, _ in slots]}"]
    problems = []
    for (name, role, item), value in zip(slots, values, strict=False):
        if role == "seed_control" and value not in ("fixed", "increment", "decrement", "randomize"):
            problems.append(f"control after generate of {name} is {value!r}")
        elif role == "value":
            problems.append(_value_problem(item, value, file_rules.get((node["type"], name))))
    return [problem for problem in problems if problem]


def _socket_problems(node: Mapping[str, Any], interface: Mapping[str, Any], links: Mapping[int, list]) -> list[str]:
    expected = {item["name"]: item for item in interface["inputs"]}
    if any(item.get("image_upload") for item in interface["inputs"]):
        expected["upload"] = {"type": "IMAGEUPLOAD", "optional": True}  # the frontend's upload button
    problems, linked = [], set()
    for slot, socket in enumerate(node.get("inputs", [])):
        name, link = socket.get("name"), links.get(socket.get("link"))
        if name not in expected or socket.get("type") != expected[name]["type"]:
            problems.append(f"input {name!r} ({socket.get('type')}) is not an input of {node['type']}")
        elif socket.get("link") is not None and (link is None or link[3:5] != [node["id"], slot]):
            problems.append(f"input {name!r} holds link {socket['link']}, which does not end there")
        elif link is not None:
            linked.add(name)
    for name, item in expected.items():
        if item["type"] not in WIDGET_TYPES and not item.get("optional") and name not in linked:
            problems.append(f"required input {name!r} ({item['type']}) is not connected")
    outputs = [output["type"] for output in interface["outputs"]]
    if [socket.get("type") for socket in node.get("outputs", [])] != outputs:
        problems.append(f"the outputs are not {outputs}")
    return problems


def validate_workflow(workflow: Mapping, interfaces: Mapping, *, file_rules: Mapping | None = None) -> list[str]:
    """Every problem found in a UI-format ``workflow`` (see the module docstring)."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    problems = []
    for node in nodes.values():
        interface = interfaces.get(node["type"])
        if interface is None and node["type"] not in FRONTEND_ONLY:
            problems.append(f"node {node['id']}: unknown node type {node['type']!r}")
        elif interface is not None:
            found = _widget_problems(node, interface, file_rules or {}) + _socket_problems(node, interface, links)
            problems += [f"node {node['id']} ({node['type']}): {problem}" for problem in found]
    for link_id, origin_id, origin_slot, target_id, target_slot, link_type in links.values():
        outputs, inputs = nodes.get(origin_id, {}).get("outputs") or [], nodes.get(target_id, {}).get("inputs") or []
        output = outputs[origin_slot] if origin_slot < len(outputs) else {}
        socket = inputs[target_slot] if target_slot < len(inputs) else {}
        if socket.get("link") != link_id or link_id not in (output.get("links") or []):
            problems.append(f"link {link_id}: not held by both node {origin_id} and node {target_id}")
        elif not output["type"] == socket["type"] == link_type:
            problems.append(f"link {link_id} ({link_type}): {output['type']} output into {socket['type']} input")
    return problems


def api_prompt(workflow: Mapping[str, Any], interfaces: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """``{node id: {"class_type", "inputs"}}`` of the workflow's nodes (see the module docstring)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[int, dict[str, Any]] = {}
    for node in (node for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY):
        if node.get("mode", 0) != 0:
            raise NotImplementedError(f"node {node['id']} is bypassed or muted: only the real frontend converts that")
        slots, values = widget_slots(interfaces[node["type"]]), node.get("widgets_values", [])
        inputs = {name: value for (name, role, _), value in zip(slots, values, strict=False) if role == "value"}
        for socket in node.get("inputs", []):
            if socket.get("link") in links:
                inputs[socket["name"]] = links[socket["link"]][1:3]
        prompt[node["id"]] = {"class_type": node["type"], "inputs": inputs}
    return prompt
