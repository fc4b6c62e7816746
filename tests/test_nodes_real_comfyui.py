"""The nodes on a REAL ComfyUI's memory manager, patcher and V3 API (skipped unless ``COMFYUI_PATH`` names a checkout).

CI cannot install ComfyUI.  Where a ComfyUI source checkout and its requirements are present, set
``COMFYUI_PATH`` to it (and run pytest with a Python that has ComfyUI's requirements): this file then
runs ``real_comfyui_check.py`` in a subprocess and checks that

* a second run of FiDeSR Upscale and of the chain loads no weights (the networks stay resident),
  each node asks the memory manager only for its own networks, and "Unload models" releases them;
* the U-Net can be loaded partly (as ``--lowvram`` does) and gives the same result;
* the real V3 API describes every node with the pinned interface (``node_interface.json``, the one the
  nodes are checked against through the stand-ins in CI), whatever fields ComfyUI adds beside it;
* bad inputs raise errors that name the node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from node_interface import REGENERATE, differences, interface_of, load_snapshot

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
pytestmark = pytest.mark.skipif(
    not (COMFYUI_PATH and (Path(COMFYUI_PATH) / "comfy" / "model_management.py").is_file()),
    reason="set COMFYUI_PATH to a ComfyUI checkout to test against the real ComfyUI",
)
NETWORKS = ["FiDeSRLRRB", "FiDeSRUNet", "FiDeSRVAE"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    script = Path(__file__).parent / "real_comfyui_check.py"
    finished = subprocess.run(
        [sys.executable, str(script), COMFYUI_PATH, str(tmp_path_factory.mktemp("real_comfyui"))],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = [line for line in finished.stdout.splitlines() if line.startswith("REPORT ")]
    assert finished.returncode == 0 and lines, finished.stderr[-4000:]
    return json.loads(lines[-1][len("REPORT ") :])


def _run(report: dict, name: str) -> dict:
    return next(run for run in report["runs"] if run["run"] == name)


def test_networks_load_once_and_stay_resident(report: dict) -> None:
    first = _run(report, "one_node 1")
    assert sorted(name for name, _ in first["loads"]) == NETWORKS and all(size > 0 for _, size in first["loads"])
    for name in ("chain 1", "one_node 2", "chain 2"):
        assert _run(report, name)["loads"] == [], name  # nothing moved: still resident
    assert report["resident"] == NETWORKS
    assert report["resident_after_unload"] == []
    assert sorted(name for name, _ in _run(report, "one_node after unload")["loads"]) == NETWORKS
    assert report["same_after_unload"] and report["one_node_equals_chain"]


def test_each_node_asks_only_for_its_own_networks(report: dict) -> None:
    # Encode, One-Step U-Net, LRRB Refine, (LF and HF: nothing), Decode.
    expected = [["FiDeSRVAE"], ["FiDeSRUNet"], ["FiDeSRLRRB"], ["FiDeSRVAE"]]
    for name in ("one_node 1", "chain 1", "chain 2"):
        assert _run(report, name)["requests"] == expected, name


def test_the_unet_loads_partly_with_the_same_result(report: dict) -> None:
    partial = report["partial_load"]
    assert partial["lowvram"] and partial["loaded_fraction"] < 0.5 and partial["cast_layers"] > 0
    assert partial["equal"]


def test_the_real_v3_api_describes_the_pinned_interface(report: dict) -> None:
    described = {node_id: interface_of(node_id, info) for node_id, info in report["node_info"].items()}
    problems = differences(load_snapshot(), described)
    assert not problems, "the real ComfyUI does not describe the pinned interface:\n" + "\n".join(
        [*problems, REGENERATE]
    )


def test_bad_inputs_raise_errors_naming_the_node(report: dict) -> None:
    errors = report["errors"]
    assert errors["plain latent"].startswith("FiDeSR LF Injection: the latent has no FiDeSR state")
    assert errors["not a model"].startswith("FiDeSR Upscale: model must come from Load FiDeSR Model")
    assert errors["overlap"] == "FiDeSR Upscale: tile_overlap must be smaller than tile_size (32), got 32"
    assert errors["wrong clip"].startswith("FiDeSR Upscale: positive is a [1, 77, 768] embedding")
    assert errors["upscale_by"].startswith("FiDeSR VAE Encode:") and "upscale_by" in errors["upscale_by"]
    assert errors["missing weights"].startswith("Load FiDeSR Model: fidesr_weights 'x.pkl'")
    assert report["oom_exception"] == "OutOfMemoryError"
