"""The promised interface of the pack's nodes, pinned in ``node_interface.json``.

A node's interface is what saved workflows and API prompts rely on: its display name, category and
output-node flag; its inputs in the order the frontend lists them (required, then optional), each with its
type, whether it is optional, and for value inputs the default, range, step and options (model-file lists
differ per machine: they are only marked ``files``); its outputs (type, name, list or not).  Descriptions
and tooltips are not pinned (``test_nodes.py`` checks that they exist).

``interface_of`` reads an interface from a ``GET /object_info`` entry (the stand-in's, a real ComfyUI's, or a
recorded one), so fields that ComfyUI adds to its description do not matter; ``differences`` compares two.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).parent / "node_interface.json"
REGENERATE = (
    "Saved workflows store node ids and widget values by position: a change here breaks them unless it only "
    "appends optional inputs.  If the change is intended, regenerate the snapshot and commit it:  "
    "FIDESR_WRITE_NODE_INTERFACE=1 python -m pytest tests/test_nodes.py -k pinned_interface"
)
PINNED_OPTIONS = ("default", "min", "max", "step", "options", "control_after_generate", "image_upload", "forceInput")
FILE_INPUTS = {
    ("FiDeSRModelLoader", "base_model"),
    ("FiDeSRModelLoader", "fidesr_weights"),
    ("FiDeSRModelFromCheckpoint", "fidesr_weights"),
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("LoadImage", "image"),
}


def interface_of(node_id: str, info: dict[str, Any]) -> dict[str, Any]:
    """The pinned fields of a node's ``/object_info`` entry (V1 or V3 layout)."""
    inputs = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, specs):
            kind, options = specs[name][0], (list(specs[name][1:]) or [{}])[0]
            item = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind}
            item |= {"optional": True} if section == "optional" else {}
            item |= {key: options[key] for key in PINNED_OPTIONS if key in options}
            item |= {"options": list(kind)} if isinstance(kind, list) else {}
            if (node_id, name) in FILE_INPUTS:
                del item["options"]
                item["files"] = True
            inputs.append(item)
    is_list = info.get("output_is_list") or [False] * len(info["output"])  # recorded V1 nodes may lack it
    outputs = zip(info["output"], info["output_name"], is_list, strict=True)
    return {
        "display_name": info["display_name"],
        "category": info["category"],
        "output_node": info["output_node"],
        "inputs": inputs,
        "outputs": [{"type": kind, "name": name, "is_list": is_list} for kind, name, is_list in outputs],
    }


def load_snapshot() -> dict[str, Any]:
    return json.loads(SNAPSHOT.read_text())["nodes"]


def write_snapshot(interfaces: dict[str, Any]) -> None:
    about = "The pack's node interface, compared by tests/test_nodes.py and tests/test_nodes_real_comfyui.py. "
    text = json.dumps({"about": about + REGENERATE, "nodes": interfaces}, indent=2)
    for item in (item for node in interfaces.values() for item in node["inputs"] + node["outputs"]):
        text = text.replace(textwrap.indent(json.dumps(item, indent=2), " " * 8), " " * 8 + json.dumps(item))
    SNAPSHOT.write_text(text + "\n")  # one line per input and output


def differences(pinned: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """What differs between two sets of interfaces, one line per difference (empty: the same)."""
    problems = [f"{node_id}: {'gone' if node_id in pinned else 'not pinned'}" for node_id in set(pinned) ^ set(actual)]
    for node_id in sorted(set(pinned) & set(actual)):
        was, now = pinned[node_id], actual[node_id]
        changed = [key for key in was if key != "inputs" and was[key] != now[key]]
        problems += [f"{node_id}.{key}: pinned {was[key]!r}, now {now[key]!r}" for key in changed]
        names = [item["name"] for item in now["inputs"]]
        if names[: len(was["inputs"])] != [item["name"] for item in was["inputs"]]:
            problems.append(f"{node_id}: the inputs are now {names}: renamed, removed or reordered")
        pairs = zip(was["inputs"], now["inputs"], strict=False)
        problems += [f"{node_id}.{a['name']}: pinned {a}, now {b}" for a, b in pairs if a != b]
        problems += [f"{node_id}.{item['name']}: a new input {item}" for item in now["inputs"][len(was["inputs"]) :]]
    return sorted(problems)
