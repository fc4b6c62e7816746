"""The shipped workflows (``workflows/*.json``, UI format), checked statically against the node definitions.

The PiSA-SR, OSEDiff and side-by-side workflows are also run (``test_workflows_families.py``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from workflow_graph import (
    CORE_FIXTURE,
    FILE_RULES,
    WORKFLOWS,
    WORKFLOWS_DIR,
    interfaces,
    load_workflow,
    node_types,
    nodes_of_type,
    source_node,
    widget_value,
)
from workflow_validation import FRONTEND_ONLY, validate_workflow, widget_slots


@pytest.fixture(scope="module")
def definitions() -> dict[str, dict[str, Any]]:
    return interfaces()


def test_the_required_workflows_are_shipped() -> None:
    names = {path.name for path in WORKFLOWS}
    assert {"FiDeSR_upscale_one_node.json", "FiDeSR_composable_chain.json", "FiDeSR_with_comfy_nodes.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_is_valid_against_the_node_definitions(path: Path, definitions: dict[str, Any]) -> None:
    workflow = load_workflow(path)
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []
    # Only our nodes, ComfyUI core nodes recorded in the fixture and frontend-only notes.
    assert set(node_types(workflow)) <= set(definitions) | FRONTEND_ONLY


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_says_which_files_go_in_which_model_folder(path: Path) -> None:
    notes = [
        " ".join(node["widgets_values"])
        for node in load_workflow(path)["nodes"]
        if node["type"] in ("Note", "MarkdownNote")
    ]
    text = "\n".join(notes)
    for needed in ("models/fidesr", "fidesr.pkl", "models/checkpoints", "v2-1_512-ema-pruned.safetensors"):
        assert needed in text
    assert "stable-diffusion-2-1-base" in text
    if nodes_of_type(load_workflow(path), "FiDeSRModelLoader"):  # the loader also reads diffusers folders
        assert "models/diffusers" in text


# Values a shipped workflow sets on purpose to something other than the default: (file, node id, input).
CHOSEN_VALUES = {
    ("FiDeSR_with_comfy_nodes.json", 13, "method"): "wavelet",
    # PiSA-SR and OSEDiff as their scripts run them: no frequency injection.
    ("PiSA-SR_upscale.json", 3, "lf_strength"): 0,
    ("PiSA-SR_upscale.json", 3, "hf_strength"): 0,
    ("OSEDiff_upscale_with_prompt.json", 5, "lf_strength"): 0,
    ("OSEDiff_upscale_with_prompt.json", 5, "hf_strength"): 0,
    ("FiDeSR_PiSA-SR_OSEDiff_side_by_side.json", 6, "lf_strength"): 0,
    ("FiDeSR_PiSA-SR_OSEDiff_side_by_side.json", 6, "hf_strength"): 0,
}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_seeds_are_fixed_and_values_are_the_defaults(path: Path, definitions: dict[str, Any]) -> None:
    workflow = load_workflow(path)
    for node in workflow["nodes"]:
        if node["type"] not in definitions or not node["type"].startswith("FiDeSR"):
            continue
        slots = widget_slots(definitions[node["type"]])
        for (name, role, item), value in zip(slots, node.get("widgets_values", []), strict=True):
            if role == "seed_control":
                assert value == "fixed", f"{path.name}: {node['type']}.{name} should not re-roll the seed"
            elif role == "value" and "default" in item:
                expected = CHOSEN_VALUES.get((path.name, node["id"], name), item["default"])
                assert value == expected, f"{path.name}: {node['type']}.{name}"


def test_one_node_workflow(definitions: dict[str, Any]) -> None:
    workflow = load_workflow(WORKFLOWS_DIR / "FiDeSR_upscale_one_node.json")
    assert sorted(set(node_types(workflow)) - FRONTEND_ONLY) == sorted(
        ["LoadImage", "FiDeSRModelLoader", "FiDeSRUpscale", "SaveImage"]
    )
    (upscale,) = nodes_of_type(workflow, "FiDeSRUpscale")
    assert source_node(workflow, upscale, "model")["type"] == "FiDeSRModelLoader"
    assert source_node(workflow, upscale, "image")["type"] == "LoadImage"
    (save,) = nodes_of_type(workflow, "SaveImage")
    assert source_node(workflow, save, "images") is upscale


def test_composable_chain_workflow(definitions: dict[str, Any]) -> None:
    workflow = load_workflow(WORKFLOWS_DIR / "FiDeSR_composable_chain.json")
    (save,) = nodes_of_type(workflow, "SaveImage")
    chain = []
    node = source_node(workflow, save, "images")
    while node is not None:
        chain.append(node["type"])
        node = source_node(workflow, node, "latent") or source_node(workflow, node, "image")
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
    (preview,) = nodes_of_type(workflow, "PreviewImage")
    decode = source_node(workflow, preview, "images")
    assert decode["type"] == "FiDeSRDecode" and source_node(workflow, decode, "latent")["type"] == "FiDeSRRefine"
    assert widget_value(definitions, decode, "color_fix") == "adain"


def test_workflow_mixing_comfy_nodes(definitions: dict[str, Any]) -> None:
    workflow = load_workflow(WORKFLOWS_DIR / "FiDeSR_with_comfy_nodes.json")
    (checkpoint,) = nodes_of_type(workflow, "CheckpointLoaderSimple")
    (restorer,) = nodes_of_type(workflow, "FiDeSRModelFromCheckpoint")
    # One checkpoint read once: its MODEL, CLIP and VAE make the restorer, its CLIP the prompt, its VAE decodes.
    assert all(source_node(workflow, restorer, name) is checkpoint for name in ("sd_model", "clip", "vae"))
    assert not nodes_of_type(workflow, "FiDeSRModelLoader")
    (residual,) = nodes_of_type(workflow, "FiDeSRResidual")
    assert source_node(workflow, residual, "model") is restorer
    text_encode = source_node(workflow, residual, "positive")
    assert text_encode["type"] == "CLIPTextEncode" and source_node(workflow, text_encode, "clip") is checkpoint
    (vae_decode,) = nodes_of_type(workflow, "VAEDecode")
    assert source_node(workflow, vae_decode, "samples")["type"].startswith("FiDeSR")
    assert source_node(workflow, vae_decode, "vae") is checkpoint


# ----------------------------------------------------------------------------- the validator can fail


def _node(workflow: dict[str, Any], node_type: str) -> dict[str, Any]:
    return nodes_of_type(workflow, node_type)[0]


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
    workflow = load_workflow(path)
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
    workflow = load_workflow(WORKFLOWS_DIR / "FiDeSR_composable_chain.json")
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []
    for name, broken in _broken_copies(workflow, definitions).items():
        assert validate_workflow(broken, definitions, file_rules=FILE_RULES), f"not detected: {name}"


def test_core_fixture_was_recorded_from_comfyui() -> None:
    fixture = json.loads(CORE_FIXTURE.read_text())
    assert fixture["comfyui_version"].startswith("0.")
    for node_id, info in fixture["nodes"].items():
        assert info["name"] == node_id and "input" in info and "output" in info
