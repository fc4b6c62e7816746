"""The ComfyUI nodes, run through the entry point ComfyUI calls, on tiny random models.

ComfyUI is not installed in CI: ``comfy_stub`` stands in for the few ComfyUI
modules the nodes import (``comfy_api_stub`` for the V3 node API), and the pack
is imported as ComfyUI imports it (by file path, under a module name made from
the path).  This file checks the import and the node definitions (the published
API, as ``GET /object_info`` serves it); the other ``test_nodes_*.py`` files run
the nodes.
Shared fixtures: ``conftest.py``; helpers: ``node_helpers.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from node_helpers import PACK_ROOT

CATEGORY = "image/upscaling/FiDeSR"

# The user-facing API: node id -> (display name, required inputs with defaults
# (None = no default), optional inputs, outputs).  Names and order must never change.
EXPECTED_NODES: dict[str, tuple[str, dict[str, Any], list[str], tuple[str, ...]]] = {
    "FiDeSRModelLoader": (
        "Load FiDeSR Model",
        {"base_model": None, "fidesr_weights": None, "precision": "auto"},
        [],
        ("FIDESR_MODEL",),
    ),
    "FiDeSREncode": (
        "FiDeSR VAE Encode",
        {"model": None, "image": None, "upscale_by": 4.0, "latent_mode": "sample", "seed": 0, "tile_size": 1024},
        [],
        ("LATENT",),
    ),
    "FiDeSRResidual": (
        "FiDeSR One-Step U-Net",
        {"model": None, "latent": None, "tile_size": 96, "tile_overlap": 32},
        ["positive", "pixel_strength", "semantic_strength"],
        ("LATENT",),
    ),
    "FiDeSRRefine": ("FiDeSR LRRB Refine", {"model": None, "latent": None}, [], ("LATENT",)),
    "FiDeSRLowFrequencyInject": (
        "FiDeSR LF Injection",
        {
            "latent": None,
            "strength": 0.1,
            "cutoff": 0.10,
            "order": 2,
            "channel_tau": 0.8,
            "channel_sharpness": 10.0,
            "gamma": 1.2,
            "filter": "official",
        },
        [],
        ("LATENT",),
    ),
    "FiDeSRHighFrequencyInject": (
        "FiDeSR HF Injection",
        {
            "latent": None,
            "strength": 0.1,
            "cutoff": 0.32,
            "order": 2,
            "gamma": 1.2,
            "channel_cutoff": 0.10,
            "channel_tau": 0.8,
            "channel_sharpness": 10.0,
            "filter": "official",
        },
        [],
        ("LATENT",),
    ),
    "FiDeSRDecode": (
        "FiDeSR VAE Decode",
        {"model": None, "latent": None, "color_fix": "adain", "tile_size": 224},
        [],
        ("IMAGE",),
    ),
    "FiDeSRUpscale": (
        "FiDeSR Upscale",
        {
            "model": None,
            "image": None,
            "upscale_by": 4.0,
            "lf_strength": 0.1,
            "hf_strength": 0.1,
            "color_fix": "adain",
            "latent_mode": "sample",
            "seed": 0,
            "tile_size": 96,
            "tile_overlap": 32,
        },
        ["positive", "pixel_strength", "semantic_strength"],
        ("IMAGE",),
    ),
    "FiDeSRColorFix": (
        "FiDeSR Color Fix",
        {"image": None, "reference": None, "method": "adain"},
        [],
        ("IMAGE",),
    ),
}
EXPECTED_COMBOS = {
    ("FiDeSRModelLoader", "precision"): ["auto", "fp32", "fp16", "bf16"],
    ("FiDeSREncode", "latent_mode"): ["sample", "mode"],
    ("FiDeSRDecode", "color_fix"): ["adain", "wavelet", "none"],
    ("FiDeSRUpscale", "color_fix"): ["adain", "wavelet", "none"],
    ("FiDeSRUpscale", "latent_mode"): ["sample", "mode"],
    ("FiDeSRLowFrequencyInject", "filter"): ["official", "radial"],
    ("FiDeSRHighFrequencyInject", "filter"): ["official", "radial"],
    ("FiDeSRColorFix", "method"): ["adain", "wavelet"],
}
# Optional widgets (appended after the first release, so saved workflows and prompts without them load): defaults.
OPTIONAL_DEFAULTS = {"pixel_strength": 1.0, "semantic_strength": 1.0}
SOCKET_TYPES = {
    "model": "FIDESR_MODEL",
    "image": "IMAGE",
    "reference": "IMAGE",
    "latent": "LATENT",
    "positive": "CONDITIONING",
}


# ----------------------------------------------------------------------------- import and definitions


def _info(comfy, node_id: str) -> dict[str, Any]:
    return comfy.nodes[node_id].GET_NODE_INFO_V1()


def _combo_options(spec: list | tuple) -> list | None:
    """A combo's choices in either layout: V1 ``[choices, {...}]`` or V3 ``["COMBO", {"options": ...}]``."""
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1]["options"] if spec[0] == "COMBO" else None


def test_pack_imports_by_file_path_under_a_mangled_name(comfy) -> None:
    pack = comfy.pack
    assert pack.__name__ == str(PACK_ROOT).replace(".", "_x_")
    # V3: ComfyUI asks comfy_entrypoint for the nodes, and would ignore it next to NODE_CLASS_MAPPINGS.
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and callable(pack.comfy_entrypoint)
    assert set(comfy.nodes) == set(EXPECTED_NODES)
    assert {node_id: _info(comfy, node_id)["display_name"] for node_id in comfy.nodes} == {
        node_id: spec[0] for node_id, spec in EXPECTED_NODES.items()
    }
    # The engine the nodes use is the pack's own copy, reached by relative imports.
    engine = comfy.module("fidesr_core.pipeline")
    assert engine.__name__ == f"{pack.__name__}.fidesr_core.pipeline"


def test_loading_the_pack_does_not_import_the_model_libraries(tmp_path: Path) -> None:
    """ComfyUI imports every pack at start-up; diffusers/transformers/peft cost seconds and wait for a model load."""
    script = (
        "import sys; from pathlib import Path\n"
        "from comfy_stub import import_pack, install_comfy_stubs, node_classes\n"
        f"install_comfy_stubs(Path({str(tmp_path)!r})); pack = import_pack(Path({str(PACK_ROOT)!r}))\n"
        "assert len(node_classes(pack)) == 9\n"
        "print(sorted(name for name in ('diffusers', 'transformers', 'peft') if name in sys.modules))"
    )
    tests_folder = str(Path(__file__).parent)
    finished = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tests_folder,
        env={**os.environ, "PYTHONPATH": tests_folder},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip() == "[]"


def _absolute_imports_of_pack_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        found += [name for name in names if name.split(".")[0] in ("nodes", "fidesr_core", "training", "tests")]
    return found


def test_every_import_inside_the_pack_is_relative() -> None:
    # In ComfyUI "nodes" is ComfyUI's own nodes.py and the pack has no importable name of its own.
    files = [PACK_ROOT / "__init__.py", *sorted((PACK_ROOT / "nodes").glob("*.py"))]
    offending = {str(path.relative_to(PACK_ROOT)): _absolute_imports_of_pack_modules(path) for path in files}
    assert {path: names for path, names in offending.items() if names} == {}


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_node_definition_matches_the_published_api(comfy, node_id: str) -> None:
    info = _info(comfy, node_id)
    _, required, optional, outputs = EXPECTED_NODES[node_id]
    inputs = info["input"]
    assert set(inputs) <= {"required", "optional"}
    assert list(inputs["required"]) == list(required)
    assert list(inputs.get("optional", {})) == optional
    assert info["input_order"] == {section: list(values) for section, values in inputs.items()}
    assert tuple(info["output"]) == outputs
    assert info["category"] == CATEGORY and info["name"] == node_id
    assert isinstance(info["description"], str) and len(info["description"]) > 40
    assert len(info["output_tooltips"]) == len(outputs) and all(info["output_tooltips"])
    assert info["output_name"] == [output.lower().replace("fidesr_", "") for output in outputs]
    for name, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
        options = spec[1]
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if name in SOCKET_TYPES:
            assert spec[0] == SOCKET_TYPES[name]
        elif required.get(name) is not None:
            assert options.get("default") == required[name]
        elif name in optional:
            assert options.get("default") == OPTIONAL_DEFAULTS[name], f"{node_id}.{name}"
        if (node_id, name) in EXPECTED_COMBOS:
            assert _combo_options(spec) == EXPECTED_COMBOS[(node_id, name)]
        if spec[0] in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"]
    node = comfy.nodes[node_id]
    parameters = inspect.signature(node.execute).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):  # the injection nodes
        fields = {field.name for field in dataclasses.fields(node.SETTINGS)}
        assert list(parameters)[0] == "latent" and set(required) - {"latent"} <= fields
    else:
        assert list(parameters) == [*required, *optional]
    json.dumps(info)  # /object_info must be able to serialise it


def test_node_defaults_are_the_engines_defaults(comfy) -> None:
    injection = comfy.module("fidesr_core.settings")

    def defaults(node_id: str) -> dict[str, Any]:
        required = _info(comfy, node_id)["input"]["required"]
        return {name: spec[1]["default"] for name, spec in required.items() if "default" in spec[1]}

    low, high, settings = (
        injection.LowFrequencySettings(),
        injection.HighFrequencySettings(),
        comfy.module("fidesr_core.settings").UpscaleSettings(),
    )
    for name, value in defaults("FiDeSRLowFrequencyInject").items():
        assert getattr(low, name) == value, name
    for name, value in defaults("FiDeSRHighFrequencyInject").items():
        assert getattr(high, name) == value, name
    assert defaults("FiDeSREncode")["tile_size"] == settings.encode_tile_size
    assert defaults("FiDeSRDecode")["tile_size"] == settings.decode_tile_size
    upscale = defaults("FiDeSRUpscale")
    assert (upscale["tile_size"], upscale["tile_overlap"]) == (settings.tile_size, settings.tile_overlap)
    assert (upscale["lf_strength"], upscale["hf_strength"]) == (low.strength, high.strength)
    assert (upscale["latent_mode"], upscale["seed"], upscale["color_fix"]) == (
        settings.latent_mode,
        settings.seed,
        settings.color_fix,
    )


def test_pyproject_says_which_comfyui_the_nodes_need() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    comfy = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    # comfy_api.v0_0_2 and the rule that input and output ids differ: both in 0.3.64, the oldest tested.
    assert comfy["requires-comfyui"] == ">=0.3.64"
    assert "comfy_api.v0_0_2 import" in (PACK_ROOT / "nodes" / "__init__.py").read_text()
