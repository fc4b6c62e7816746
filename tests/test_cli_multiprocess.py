"""``upscale`` as several processes: two CPU ranks under torchrun, talking over gloo.

This is the code path of ``torchrun --nproc_per_node N`` / ``accelerate launch`` on N GPUs with the
device swapped for the CPU: rank 0 plans, each rank upscales its block of the plan, rank 0 prints one summary,
and the outputs are byte for byte those of one process. A second run after losing outputs (what
a killed run leaves) redoes only those.

Every two-rank run also shows that each rank's process group is gone when the command returns: no
gloo thread is left. One left alive was what aborted ranks after their work was done (a gloo worker
releasing the last gather's tensors while the interpreter shut down: "terminate called without an
active exception", exit -6), a race that only shows now and then on a busy machine; the threads left
show it every time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ldm_export import write_diffusers_folder
from PIL import Image

from fidesr_core.loading.weights import save_restorer_weights
from fidesr_core.networks.tiny import tiny_fidesr_weights

REPO = Path(__file__).resolve().parents[1]
NAMES = ("a.png", "b.png", "c.png", "d/e.png", "d/f.png")
# `python -m fidesr_core upscale …`, then the names of the native threads still running in the rank (Linux).
AFTER_THE_COMMAND = """
import os, sys
from fidesr_core.app.cli import main
code = main(sys.argv[1:], prog="fidesr")
tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []
names = sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in tasks)
sys.stdout.write(f"rank {os.environ['RANK']} threads after the command: {names or 'not listed (no /proc)'}\\n")
sys.exit(code)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ranks")
    save_restorer_weights(tiny_fidesr_weights(tiny, seed=4), root / "fidesr.pkl")
    write_diffusers_folder(tiny, root / "sd21-tiny")
    for index, name in enumerate(NAMES):
        path = root / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(index)
        Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(path)
    return {"root": root, "photos": root / "photos", "base": root / "sd21-tiny", "weights": root / "fidesr.pkl"}


def _upscale(workspace: dict[str, Path], output: Path, ranks: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "fidesr_core"]
    if ranks > 1:
        script = workspace["root"] / "after_the_command.py"
        script.write_text(AFTER_THE_COMMAND)
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(script),
        ]
    command = [
        *launcher,
        "upscale",
        str(workspace["photos"]),
        "--recursive",
        "-o",
        str(output),
        "--base",
        str(workspace["base"]),
        "--weights",
        str(workspace["weights"]),
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each rank; fp32 moves with threads
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    finished = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600, check=False
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    if ranks > 1:  # each rank's lines whole, not mixed with the other's
        lines = finished.stdout.splitlines()
        assert sum(line.startswith("FiDeSR on cpu") and line.endswith("image(s))") for line in lines) == ranks, lines
        left = [line for line in lines if "threads after the command" in line]
        assert len(left) == ranks, finished.stdout[-3000:]
        assert not any("gloo" in line for line in left), left  # pt_gloo_runloop, gloo_tcp_loop
    return finished


def test_two_ranks_share_the_work_print_one_summary_and_match_one_process(workspace, tmp_path: Path) -> None:
    single = _upscale(workspace, tmp_path / "single", ranks=1)
    assert "written 5, skipped 0 (exist), failed 0" in single.stdout

    double = _upscale(workspace, tmp_path / "double", ranks=2)
    assert double.stdout.count("written 5, skipped 0 (exist), failed 0") == 1  # one summary, by rank 0
    assert "rank 0 of 2, 3 image(s)" in double.stdout and "rank 1 of 2, 2 image(s)" in double.stdout
    for name in NAMES:
        target = Path(name).with_suffix(".png")
        assert (tmp_path / "double" / target).read_bytes() == (tmp_path / "single" / target).read_bytes(), name

    # What a killed run leaves: the last output of each rank's block missing (writes are atomic, so never
    # half a PNG under its name). The same blocks again: each rank redoes its one.
    expected = {name: (tmp_path / "double" / name).read_bytes() for name in NAMES}
    (tmp_path / "double" / "c.png").unlink()
    (tmp_path / "double" / "d" / "f.png").unlink()
    resumed = _upscale(workspace, tmp_path / "double", ranks=2)
    assert resumed.stdout.count("written 2, skipped 3 (exist), failed 0") == 1
    assert "rank 0 of 2, 1 image(s)" in resumed.stdout and "rank 1 of 2, 1 image(s)" in resumed.stdout
    assert {name: (tmp_path / "double" / name).read_bytes() for name in NAMES} == expected
