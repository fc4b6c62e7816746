"""The model metadata the shipped workflows carry for ComfyUI's missing-models dialog.

The frontend (1.27 to 1.35, as read from its source) collects ``properties.models`` of each node
whose widget values include the entry's ``name``, plus the workflow's own ``models`` list, and
lists every entry missing from ``models/<directory>/``; it offers a download only from
huggingface.co (or civitai.com) and only for ``.safetensors``/``.sft`` names. These tests hold the
workflows to that, and to the sources ``fidesr_core.app.download`` knows (the Hub for FiDeSR and the base,
the authors' pages for PiSA-SR and OSEDiff).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fidesr_core.app.download import RELEASED_WEIGHTS, SD21_BASE, KnownFile

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
HUB = "https://huggingface.co/"
DOWNLOADABLE_SOURCES = (HUB, "https://civitai.com/")
DOWNLOADABLE_SUFFIXES = (".safetensors", ".sft")
FOLDER_OF_NODE = {
    "FiDeSRModelLoader": {"fidesr", "checkpoints"},
    "FiDeSRModelFromCheckpoint": {"fidesr"},
    "CheckpointLoaderSimple": {"checkpoints"},
}
WEIGHTS_WIDGET = {"FiDeSRModelLoader": 1, "FiDeSRModelFromCheckpoint": 0}  # where each node names the weights


def _url(known, repo_id: str | None = None) -> str:
    if not isinstance(known, KnownFile):
        return known.page  # published outside the Hub
    return f"{HUB}{repo_id or known.sources[0]}/resolve/main/{known.name}"


WEIGHTS_BY_NAME = {known.name: known for known in RELEASED_WEIGHTS.values()}


def _entries(workflow: dict[str, Any]) -> list[tuple[dict[str, Any] | None, dict[str, Any]]]:
    """``(node or None for the workflow's own list, entry)`` for every model entry."""
    found = [(None, entry) for entry in workflow.get("models", [])]
    for node in workflow["nodes"]:
        found += [(node, entry) for entry in node.get("properties", {}).get("models", [])]
    return found


def _downloadable(entry: dict[str, Any]) -> bool:
    return entry["url"].startswith(DOWNLOADABLE_SOURCES) and entry["name"].endswith(DOWNLOADABLE_SUFFIXES)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_every_entry_is_well_formed_and_one_the_frontend_uses(path: Path) -> None:
    workflow = json.loads(path.read_text())
    entries = _entries(workflow)
    assert entries, "no model metadata"
    known = {_url(file): file for file in (SD21_BASE, *RELEASED_WEIGHTS.values())}
    for node, entry in entries:
        assert set(entry) >= {"name", "url", "directory"}, entry
        assert entry["url"] in known, f"{entry['url']} is not a source fidesr_core.app.download knows"
        assert entry["name"] == known[entry["url"]].name
        assert entry["directory"] == getattr(known[entry["url"]], "comfyui_folder", "fidesr")
        if node is not None:
            # The frontend keeps a node's entry only while one of its widgets holds that exact name.
            assert entry["name"] in node["widgets_values"], (node["type"], entry["name"])
            assert entry["directory"] in FOLDER_OF_NODE[node["type"]], (node["type"], entry)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_the_base_is_offered_as_a_download_for_the_checkpoints_folder_the_loader_reads(path: Path) -> None:
    workflow = json.loads(path.read_text())
    offered = [entry for _, entry in _entries(workflow) if entry["name"] == SD21_BASE.name and _downloadable(entry)]
    assert offered and all(entry["directory"] == "checkpoints" for entry in offered)
    # Where the download lands is what the FiDeSR loader selects, and what Load Checkpoint selects.
    for node in workflow["nodes"]:
        if node["type"] == "FiDeSRModelLoader":
            assert node["widgets_values"][0] == f"checkpoints/{SD21_BASE.name}"
        if node["type"] == "CheckpointLoaderSimple":
            assert node["widgets_values"][0] == SD21_BASE.name


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_the_weights_are_listed_on_each_loader_with_where_to_get_them(path: Path) -> None:
    workflow = json.loads(path.read_text())
    loaders = [node for node in workflow["nodes"] if node["type"] in WEIGHTS_WIDGET]
    assert loaders
    for node in loaders:
        weights = WEIGHTS_BY_NAME[
            node["widgets_values"][WEIGHTS_WIDGET[node["type"]]]
        ]  # a released file of one of the families
        entries = node["properties"]["models"]
        assert {"name": weights.name, "url": _url(weights), "directory": "fidesr"} in entries
        # A pickle: the dialog names the file, its folder and its page, but does not fetch it itself.
        assert not any(_downloadable(entry) for entry in entries if entry["name"] == weights.name)
