"""``download`` against a stand-in Hub on loopback (``hub_stand_in``), never the internet.

The stand-in serves tiny model files in the mirrors' layout. ``huggingface_hub`` is pointed at
it through ``HF_ENDPOINT`` for the command line (a subprocess, as a user runs it: huggingface_hub reads it
at import) and through the ``endpoint`` argument for the in-process core function.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hub_stand_in import hub_stand_in
from ldm_export import write_ldm_checkpoint
from safetensors.torch import save_file

from fidesr_core.app.download import ELSEWHERE, FIDESR_WEIGHTS, SD21_BASE, DownloadError, fetch_known_file
from fidesr_core.loading.identify import identify_model_file
from fidesr_core.loading.weights import load_restorer_weights, save_restorer_weights
from fidesr_core.networks.tiny import tiny_fidesr_weights

REPO = Path(__file__).resolve().parents[1]
BASE_NAME, WEIGHTS_NAME = SD21_BASE.name, FIDESR_WEIGHTS.name
FIRST_MIRROR, SECOND_MIRROR = SD21_BASE.sources
WEIGHTS_REPO = FIDESR_WEIGHTS.sources[0]


@pytest.fixture(scope="module")
def served_files(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("served")
    base = write_ldm_checkpoint(tiny, folder / BASE_NAME)
    save_restorer_weights(tiny_fidesr_weights(tiny, seed=4), folder / WEIGHTS_NAME)
    save_file({"weight": torch.zeros(4, 4)}, folder / "wrong.safetensors")  # a real file, but no base model
    return {
        "base": base.read_bytes(),
        "weights": (folder / WEIGHTS_NAME).read_bytes(),
        "wrong": (folder / "wrong.safetensors").read_bytes(),
    }


def _run_cli(endpoint: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for variable in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        environment.pop(variable, None)
    return subprocess.run(
        [sys.executable, "-m", "fidesr_core", "download", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_sources_are_tried_in_order_and_only_a_checked_file_is_kept(served_files, tmp_path: Path) -> None:
    repos = {
        WEIGHTS_REPO: {WEIGHTS_NAME: served_files["weights"]},
        # the first mirror is gone; the second serves a file that is not SD 2.1-base
        SECOND_MIRROR: {BASE_NAME: served_files["wrong"]},
        "someone/sd21-copy": {BASE_NAME: served_files["base"]},
    }
    models = tmp_path / "models"
    with hub_stand_in(repos) as hub:
        done = _run_cli(hub.url, tmp_path / "hf", "--to", str(models), "--source", "someone/sd21-copy")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f"{WEIGHTS_NAME} from {WEIGHTS_REPO}: fetched and checked (3.0 MB)"
        assert lines[1] == f"{BASE_NAME} from {FIRST_MIRROR}: not fetched (HTTP 404 (not found))"
        assert lines[2].startswith(f"{BASE_NAME} from {SECOND_MIRROR}: removed, not Stable Diffusion 2.1-base (")
        assert lines[3].startswith(f"{BASE_NAME} from someone/sd21-copy: fetched and checked")
        assert lines[4:] == [f"ready: {models / WEIGHTS_NAME}", f"ready: {models / BASE_NAME}"]
        asked = dict.fromkeys(r.repo_id for r in hub.requests if r.filename == BASE_NAME)
        assert list(asked) == [FIRST_MIRROR, SECOND_MIRROR, "someone/sd21-copy"]

        assert (models / BASE_NAME).read_bytes() == served_files["base"]
        assert (models / WEIGHTS_NAME).read_bytes() == served_files["weights"]
        assert identify_model_file(models / BASE_NAME).is_sd2
        assert load_restorer_weights(models / WEIGHTS_NAME).lora["unet"].rank == 2
        assert sorted(path.name for path in models.iterdir()) == [WEIGHTS_NAME, BASE_NAME]  # nothing staged is left

        before = len(hub.requests)
        again = _run_cli(hub.url, tmp_path / "hf", "--to", str(models))
        assert again.returncode == 0 and "already in" in again.stdout
        assert len(hub.requests) == before  # present files are checked on disk, not fetched again


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_without_a_network_one_line_per_source_an_exit_code_and_what_to_fetch_by_hand(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"  # nothing listens: connection refused, like no network
    models = tmp_path / "models"
    start = time.monotonic()
    done = _run_cli(endpoint, tmp_path / "hf", "--to", str(models))
    elapsed = time.monotonic() - start
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    tried = [(WEIGHTS_NAME, WEIGHTS_REPO), (BASE_NAME, FIRST_MIRROR), (BASE_NAME, SECOND_MIRROR)]
    assert len(lines) == len(tried)  # one line per source, no retry chatter
    for line, (name, repo_id) in zip(lines, tried, strict=True):
        assert line.startswith(f"{name} from {repo_id}: not fetched (") and "Connection refused" in line, line
    errors = done.stderr.splitlines()
    assert errors[0].startswith("error: could not fetch fidesr.pkl from any of 1 source(s)")
    assert f"could not fetch {BASE_NAME} from any of 2 source(s)" in errors[0]
    # README's other ways, said once for both files
    assert errors[0].endswith(ELSEWHERE) and done.stderr.count("--source OWNER/NAME") == 1
    assert "HF_ENDPOINT" in ELSEWHERE and "--source" in ELSEWHERE
    for repo_id, name in ((WEIGHTS_REPO, WEIGHTS_NAME), (FIRST_MIRROR, BASE_NAME), (SECOND_MIRROR, BASE_NAME)):
        assert f"  {endpoint}/{repo_id}/resolve/main/{name}" in errors
    assert f"  as {models / WEIGHTS_NAME} (for ComfyUI: ComfyUI/models/fidesr/{WEIGHTS_NAME})" in errors
    assert f"  as {models / BASE_NAME} (for ComfyUI: ComfyUI/models/checkpoints/{BASE_NAME})" in errors
    assert len(errors) == len(set(errors))  # no line twice
    assert elapsed < 60  # no retry loops on an unreachable source
    assert not (models / WEIGHTS_NAME).exists() and not (models / BASE_NAME).exists()


def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        assert isinstance(address, tuple) and address[0] == "127.0.0.1", f"network access attempted: {address}"
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def test_an_interrupted_download_resumes_where_it_stopped_with_byte_progress(
    served_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    _loopback_only(monkeypatch)
    weights = served_files["weights"]
    half = len(weights) // 2
    with hub_stand_in({WEIGHTS_REPO: {WEIGHTS_NAME: weights}}) as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        hub.cut_once[WEIGHTS_NAME] = half  # the connection drops half-way, and the server stays unreachable
        first: list[tuple[int, int | None]] = []
        with pytest.raises(DownloadError) as caught:
            fetch_known_file(FIDESR_WEIGHTS, tmp_path, progress=lambda *at: first.append(at), endpoint=hub.url)
        (attempt,) = caught.value.attempts
        assert str(caught.value) == f"could not fetch {WEIGHTS_NAME} from any of 1 source(s); {ELSEWHERE}"
        assert attempt.startswith(f"{WEIGHTS_NAME} from {WEIGHTS_REPO}: not fetched (RemoteDisconnected: ")
        assert not (tmp_path / WEIGHTS_NAME).exists()
        assert first[-1] == (half, len(weights))

        hub.broken.clear()  # back on line
        second: list[tuple[int, int | None]] = []
        path = fetch_known_file(FIDESR_WEIGHTS, tmp_path, progress=lambda *at: second.append(at), endpoint=hub.url)
    assert path.read_bytes() == weights
    assert hub.gets(WEIGHTS_NAME)[-1].range == f"bytes={half}-"  # only the missing half was asked for
    assert second[0] == (half, len(weights)) and second[-1] == (len(weights), len(weights))
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]


def test_a_file_already_there_is_checked_and_never_replaced(tmp_path: Path) -> None:
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not weights at all")
    with pytest.raises(Exception, match="exists but is not the FiDeSR weights") as caught:
        fetch_known_file(FIDESR_WEIGHTS, tmp_path)
    assert not isinstance(caught.value, DownloadError)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == b"not weights at all"
