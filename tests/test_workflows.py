"""The shipped workflows (``workflows/*.json``, UI format), checked statically.

Node definitions: the pack's nodes as ComfyUI's ``/object_info`` describes
them (built from the classes), ComfyUI's core nodes from a fixture recorded
from a real ComfyUI.  Running the workflows needs a real ComfyUI (see
shared/COMFYUI-TESTING.md); this file checks everything that can be checked
without one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from comfy_stub import import_pack, install_comfy_stubs, node_classes, remove_from_sys_modules
from workflow_validation import (
    VIRTUAL_NODE_TYPES,
    load_core_definitions,
    node_info,
    validate_workflow,
    widget_slots,
)

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
CORE_FIXTURE = Path(__file__).parent / "fixtures" / "comfy_core_nodes.json"

# Model-file combos list whatever is on the machine: check the form of the value instead.
FILE_RULES = {
    ("FiDeSRModelLoader", "base_model"): lambda value: (
        isinstance(value, str) and value.startswith(("diffusers/", "checkpoints/"))
    ),
    ("FiDeSRModelLoader", "fidesr_weights"): lambda value: (
        isinstance(value, str) and value.endswith((".pkl", ".safetensors"))
    ),
    ("CheckpointLoaderSimple", "ckpt_name"): lambda value: isinstance(value, str) and value.endswith(".safetensors"),
    ("LoadImage", "image"): lambda value: isinstance(value, str) and bool(value),
}


@pytest.fixture(scope="module")
def definitions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    install_comfy_stubs(tmp_path_factory.mktemp("models"))
    try:
        pack = import_pack(PACK_ROOT)
        ours = {node_id: node_info(node_id, node_class) for node_id, node_class in node_classes(pack).items()}
    finally:
        remove_from_sys_modules(PACK_ROOT)
    core = load_core_definitions(CORE_FIXTURE)
    assert not set(ours) & set(core)
    # What /object_info returns is JSON: compare in that form.
    return json.loads(json.dumps({**core, **ours}))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _types(workflow: dict[str, Any]) -> list[str]:
    return [node["type"] for node in workflow["nodes"]]


def _by_type(workflow: dict[str, Any], node_type: str) -> list[dict[str, Any]]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def _source(workflow: dict[str, Any], node: dict[str, Any], input_name: str) -> dict[str, Any] | None:
    """The node feeding ``input_name`` of ``node``."""
    socket = next((s for s in node["inputs"] if s["name"] == input_name), None)
    if socket is None or socket.get("link") is None:
        return None
    link = next(link for link in workflow["links"] if link[0] == socket["link"])
    return next(n for n in workflow["nodes"] if n["id"] == link[1])


def _widget(definitions: dict[str, Any], node: dict[str, Any], name: str) -> Any:
    slots = widget_slots(definitions[node["type"]])
    index = next(i for i, (slot_name, role, _) in enumerate(slots) if slot_name == name and role == "value")
    return node["widgets_values"][index]


def test_the_required_workflows_are_shipped() -> None:
    names = {path.name for path in WORKFLOWS}
    assert {"FiDeSR_upscale_one_node.json", "FiDeSR_composable_chain.json", "FiDeSR_with_comfy_nodes.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_is_valid_against_the_node_definitions(path: Path, definitions: dict[str, Any]) -> None:
    workflow = _load(path)
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []
    # Only our nodes, ComfyUI core nodes recorded in the fixture and frontend-only notes.
    assert set(_types(workflow)) <= set(definitions) | VIRTUAL_NODE_TYPES


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_says_which_files_go_in_which_model_folder(path: Path) -> None:
    notes = [
        " ".join(node["widgets_values"]) for node in _load(path)["nodes"] if node["type"] in ("Note", "MarkdownNote")
    ]
    text = "\n".join(notes)
    for needed in ("models/fidesr", "fidesr.pkl", "models/checkpoints", "v2-1_512-ema-pruned.safetensors"):
        assert needed in text
    assert "models/diffusers" in text and "stable-diffusion-2-1-base" in text


# Values a shipped workflow sets on purpose to something other than the default.
CHOSEN_VALUES = {("FiDeSR_with_comfy_nodes.json", "FiDeSRColorFix", "method"): "wavelet"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_seeds_are_fixed_and_values_are_the_defaults(path: Path, definitions: dict[str, Any]) -> None:
    workflow = _load(path)
    for node in workflow["nodes"]:
        if node["type"] not in definitions or not node["type"].startswith("FiDeSR"):
            continue
        slots = widget_slots(definitions[node["type"]])
        for (name, role, spec), value in zip(slots, node.get("widgets_values", []), strict=True):
            if role == "seed_control":
                assert value == "fixed", f"{path.name}: {node['type']}.{name} should not re-roll the seed"
            elif role == "value" and "default" in spec[1]:
                expected = CHOSEN_VALUES.get((path.name, node["type"], name), spec[1]["default"])
                assert value == expected, f"{path.name}: {node['type']}.{name}"


def test_one_node_workflow(definitions: dict[str, Any]) -> None:
    workflow = _load(PACK_ROOT / "workflows" / "FiDeSR_upscale_one_node.json")
    assert sorted(set(_types(workflow)) - VIRTUAL_NODE_TYPES) == sorted(
        ["LoadImage", "FiDeSRModelLoader", "FiDeSRUpscale", "SaveImage"]
    )
    (upscale,) = _by_type(workflow, "FiDeSRUpscale")
    assert _source(workflow, upscale, "model")["type"] == "FiDeSRModelLoader"
    assert _source(workflow, upscale, "image")["type"] == "LoadImage"
    (save,) = _by_type(workflow, "SaveImage")
    assert _source(workflow, save, "images") is upscale


def test_composable_chain_workflow(definitions: dict[str, Any]) -> None:
    workflow = _load(PACK_ROOT / "workflows" / "FiDeSR_composable_chain.json")
    (save,) = _by_type(workflow, "SaveImage")
    chain = []
    node = _source(workflow, save, "images")
    while node is not None:
        chain.append(node["type"])
        node = _source(workflow, node, "latent") or _source(workflow, node, "image")
    assert chain == [
        "FiDeSRDecode",
        "FiDeSRHighFrequencyInject",
        "FiDeSRLowFrequencyInject",
        "FiDeSRRefine",
        "FiDeSRResidual",
        "FiDeSREncode",
        "LoadImage",
    ]
    # The comparison: a preview of the result before the frequency injections.
    (preview,) = _by_type(workflow, "PreviewImage")
    decode = _source(workflow, preview, "images")
    assert decode["type"] == "FiDeSRDecode" and _source(workflow, decode, "latent")["type"] == "FiDeSRRefine"
    assert _widget(definitions, decode, "color_fix") == "adain"


def test_workflow_mixing_comfy_nodes(definitions: dict[str, Any]) -> None:
    workflow = _load(PACK_ROOT / "workflows" / "FiDeSR_with_comfy_nodes.json")
    (residual,) = _by_type(workflow, "FiDeSRResidual")
    text_encode = _source(workflow, residual, "positive")
    assert text_encode["type"] == "CLIPTextEncode"
    assert _source(workflow, text_encode, "clip")["type"] == "CheckpointLoaderSimple"
    (vae_decode,) = _by_type(workflow, "VAEDecode")
    assert _source(workflow, vae_decode, "samples")["type"].startswith("FiDeSR")
    assert _source(workflow, vae_decode, "vae")["type"] == "CheckpointLoaderSimple"
    (checkpoint,) = _by_type(workflow, "CheckpointLoaderSimple")
    (loader,) = _by_type(workflow, "FiDeSRModelLoader")
    # Both loaders read the same SD 2.1-base file.
    base_model = _widget(definitions, loader, "base_model")
    assert base_model == "checkpoints/" + _widget(definitions, checkpoint, "ckpt_name")


# ----------------------------------------------------------------------------- the validator can fail


def _node(workflow: dict[str, Any], node_type: str) -> dict[str, Any]:
    return _by_type(workflow, node_type)[0]


def _broken_copies(workflow: dict[str, Any], definitions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    broken: dict[str, dict[str, Any]] = {}

    def variant(name: str) -> dict[str, Any]:
        broken[name] = copy.deepcopy(workflow)
        return broken[name]

    lf_index = [name for name, role, _ in widget_slots(definitions["FiDeSRLowFrequencyInject"])].index("strength")
    _node(variant("strength above max"), "FiDeSRLowFrequencyInject")["widgets_values"][lf_index] = 5.0
    order_index = [name for name, role, _ in widget_slots(definitions["FiDeSRLowFrequencyInject"])].index("order")
    _node(variant("float for an INT"), "FiDeSRLowFrequencyInject")["widgets_values"][order_index] = 2.5
    _node(variant("unknown combo value"), "FiDeSRLowFrequencyInject")["widgets_values"][-1] = "gaussian"
    _node(variant("missing widget value"), "FiDeSRDecode")["widgets_values"].pop()
    _node(variant("custom node pack"), "FiDeSRRefine")["type"] = "SomeOtherPackNode"
    wrong_type = variant("link type mismatch")
    for link in wrong_type["links"]:
        if link[5] == "LATENT":
            link[5] = "IMAGE"
            break
    unlinked = variant("required input unconnected")
    refine = _node(unlinked, "FiDeSRRefine")
    refine["inputs"][0]["link"] = None
    renamed = variant("renamed input")
    _node(renamed, "FiDeSRResidual")["inputs"][1]["name"] = "samples"
    base_index = 0
    _node(variant("bad base_model form"), "FiDeSRModelLoader")["widgets_values"][base_index] = "v2-1.safetensors"
    return broken


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_with_extra_node_properties_stays_valid(path: Path, definitions: dict[str, Any]) -> None:
    """The frontend's model list (``properties.models``) and other properties are not part of a node's inputs."""
    workflow = _load(path)
    for node in workflow["nodes"]:
        node.setdefault("properties", {})["models"] = [
            {
                "name": "fidesr.safetensors",
                "url": "https://huggingface.co/x/y/resolve/main/f.safetensors",
                "directory": "fidesr",
            }
        ]
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []


def test_validator_finds_broken_workflows(definitions: dict[str, Any]) -> None:
    workflow = _load(PACK_ROOT / "workflows" / "FiDeSR_composable_chain.json")
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []
    for name, broken in _broken_copies(workflow, definitions).items():
        assert validate_workflow(broken, definitions, file_rules=FILE_RULES), f"not detected: {name}"


def test_core_fixture_was_recorded_from_comfyui() -> None:
    fixture = json.loads(CORE_FIXTURE.read_text())
    assert fixture["comfyui_version"].startswith("0.")
    for node_id, info in fixture["nodes"].items():
        assert info["name"] == node_id and "input" in info and "output" in info
