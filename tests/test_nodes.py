"""The ComfyUI nodes, run through the entry point ComfyUI calls, on tiny random models.

ComfyUI is not installed in CI: ``comfy_stub`` stands in for the few ComfyUI
modules the nodes import (the V3 node API included), and the pack is imported as
ComfyUI imports it (by file path, under a module name made from the path).  This
file checks the import and the node definitions: what they declare (as
``GET /object_info`` serves it) against the pinned interface ``node_interface.json``
(compared with a real ComfyUI in ``test_nodes_real_comfyui.py``), and the rules
the descriptions follow; the other ``test_nodes_*.py`` files run the nodes.
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
from node_interface import REGENERATE, differences, interface_of, load_snapshot, write_snapshot

CATEGORY = "image/upscaling/FiDeSR"
PINNED = load_snapshot()  # node id -> the promised interface (node_interface.py says what it holds)


# ----------------------------------------------------------------------------- import and definitions


def _info(comfy, node_id: str) -> dict[str, Any]:
    return comfy.nodes[node_id].GET_NODE_INFO_V1()


def test_pack_imports_by_file_path_under_a_mangled_name(comfy) -> None:
    pack = comfy.pack
    assert pack.__name__ == str(PACK_ROOT).replace(".", "_x_")
    # V3: ComfyUI asks comfy_entrypoint for the nodes, and would ignore it next to NODE_CLASS_MAPPINGS.
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and callable(pack.comfy_entrypoint)
    assert set(comfy.nodes) == set(PINNED)
    # The engine the nodes use is the pack's own copy, reached by relative imports.
    engine = comfy.module("fidesr_core.pipeline")
    assert engine.__name__ == f"{pack.__name__}.fidesr_core.pipeline"


def test_loading_the_pack_does_not_import_the_model_libraries(tmp_path: Path) -> None:
    """ComfyUI imports every pack at start-up; diffusers/transformers/peft cost seconds and wait for a model load."""
    script = (
        "import sys; from pathlib import Path\n"
        "from comfy_stub import import_pack, install_comfy_stubs, node_classes\n"
        f"install_comfy_stubs(Path({str(tmp_path)!r})); pack = import_pack(Path({str(PACK_ROOT)!r}))\n"
        "assert len(node_classes(pack)) == 10\n"
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


def test_the_nodes_declare_the_pinned_interface(comfy) -> None:
    declared = {node_id: interface_of(node_id, _info(comfy, node_id)) for node_id in comfy.nodes}
    if os.environ.get("FIDESR_WRITE_NODE_INTERFACE"):
        write_snapshot(declared)
    problems = differences(load_snapshot(), declared)
    assert not problems, "the nodes no longer declare the pinned interface:\n" + "\n".join([*problems, REGENERATE])


@pytest.mark.parametrize("node_id", sorted(PINNED))
def test_node_description_follows_the_rules(comfy, node_id: str) -> None:
    info, pinned = _info(comfy, node_id), PINNED[node_id]
    assert pinned["category"] == CATEGORY and not pinned["output_node"]
    assert isinstance(info["description"], str) and len(info["description"]) > 40
    assert len(info["output_tooltips"]) == len(pinned["outputs"]) and all(info["output_tooltips"])
    assert [o["name"] for o in pinned["outputs"]] == [
        o["type"].lower().replace("fidesr_", "") for o in pinned["outputs"]
    ]
    specs = {**info["input"]["required"], **info["input"].get("optional", {})}
    for item in pinned["inputs"]:
        assert specs[item["name"]][1].get("tooltip"), f"{node_id}.{item['name']} has no tooltip"
        if item["type"] in ("INT", "FLOAT"):
            assert item["min"] <= item["default"] <= item["max"], f"{node_id}.{item['name']}"
        if item.get("optional") and item["type"] in ("INT", "FLOAT", "COMBO"):
            assert "default" in item  # prompts and workflows saved before it was appended run with the default
    node, names = comfy.nodes[node_id], [item["name"] for item in pinned["inputs"]]
    parameters = inspect.signature(node.execute).parameters
    named = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if len(named) < len(parameters):  # the other inputs go by name into the settings (the injections' own)
        settings = getattr(node, "SETTINGS", comfy.module("fidesr_core.settings").UpscaleSettings)
        assert named == [name for name in names if name in named]
        assert set(names) - set(named) <= {field.name for field in dataclasses.fields(settings)}
    else:
        assert list(parameters) == names
    json.dumps(info)  # /object_info must be able to serialise it


def test_an_input_name_means_one_type_on_every_node() -> None:
    types: dict[str, set[str]] = {}
    for pinned in PINNED.values():
        for item in pinned["inputs"]:
            types.setdefault(item["name"], set()).add(item["type"])
    assert {name: kinds for name, kinds in types.items() if len(kinds) > 1} == {}
    assert types["model"] == {"FIDESR_MODEL"} and types["latent"] == {"LATENT"} and types["image"] == {"IMAGE"}


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
