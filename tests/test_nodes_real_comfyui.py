"""The nodes on a REAL ComfyUI's memory manager, patcher and V3 API (skipped unless ``COMFYUI_PATH`` names a checkout).

CI cannot install ComfyUI.  Where a ComfyUI source checkout and its requirements are present, set
``COMFYUI_PATH`` to it (and run pytest with a Python that has ComfyUI's requirements): this file then
runs ``real_comfyui_check.py`` in a subprocess and checks that

* a second run of FiDeSR Upscale and of the chain loads no weights (the networks stay resident),
  each node asks the memory manager only for its own networks, and "Unload models" releases them;
* the U-Net can be loaded partly (as ``--lowvram`` does) and gives the same result;
* the real V3 API describes every node with the pinned interface (``node_interface.json``, the one the
  nodes are checked against through the stand-ins in CI), whatever fields ComfyUI adds beside it;
* bad inputs raise errors that name the node;
* FiDeSR Model from Checkpoint on Load Checkpoint's MODEL, CLIP and VAE gives Load FiDeSR Model's images for
  all three families (``real_comfyui_checkpoint.py``, a full-size random SD 2.1; several minutes on a CPU),
  while ComfyUI holds one SD 2.1 U-Net and the user's MODEL stays unpatched.
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


def _reported(script: str, folder: Path, timeout: int) -> dict:
    finished = subprocess.run(
        [sys.executable, str(Path(__file__).parent / script), COMFYUI_PATH, str(folder)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in finished.stdout.splitlines() if line.startswith("REPORT ")]
    assert finished.returncode == 0 and lines, finished.stderr[-4000:]
    return json.loads(lines[-1][len("REPORT ") :])


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _reported("real_comfyui_check.py", tmp_path_factory.mktemp("real_comfyui"), 900)


@pytest.fixture(scope="module")
def checkpoint_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _reported("real_comfyui_checkpoint.py", tmp_path_factory.mktemp("real_comfyui_checkpoint"), 2400)


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
    assert report["patchers_of_comfys_class"]  # CoreModelPatcher where ComfyUI has it: dynamic VRAM on NVIDIA


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


def test_the_checkpoints_model_gives_the_loaders_images(checkpoint_report: dict) -> None:
    families = checkpoint_report["families"]
    assert {family["family"] for family in families.values()} == {"FiDeSR", "PiSA-SR", "OSEDiff"}
    assert set(families["fidesr"]["cases"]) == {"untiled", "tiled"} and "adjustable" in families["pisa-sr"]["cases"]
    for name, family in families.items():
        for case, result in family["cases"].items():
            assert result["levels"] <= 1.0, (name, case, result)


def test_comfyui_holds_one_sd21_unet_and_the_users_model_is_unpatched(checkpoint_report: dict) -> None:
    for name, family in checkpoint_report["families"].items():
        held = family["held_by_comfyui"]
        assert held.count("BaseModel") == 1 and "FiDeSRUNet" not in held and "FiDeSRVAE" in held, (name, held)
        assert family["user_model_unpatched"], name
