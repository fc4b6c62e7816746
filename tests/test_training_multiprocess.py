"""The trainer as several processes: two CPU ranks under torchrun with Accelerate's gloo backend.

This is the code path of ``accelerate launch --multi_gpu`` (one process per GPU) with the
device swapped for the CPU: data sharded per rank, gradients averaged by DDP, checkpoints
written once by the main process with every rank's RNG state, and an exact resume.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from training_helpers import write_training_workspace

from fidesr_core.loading.weights import load_restorer_weights

pytest.importorskip("accelerate")
pytest.importorskip("lpips")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_two_ranks(workspace: dict[str, Path], output: Path, *extra: str) -> subprocess.CompletedProcess:
    config = workspace["root"] / "run.yaml"
    config.write_text(
        "model:\n  base: tiny\n  lora_rank: 4\n"
        f"data:\n  hq_folders: ['{workspace['hq']}']\n  crop_size: 32\n  num_workers: 0\n"
        "loss:\n  lpips_pretrained: false\n  daw_start: 1\n  daw_ramp: 2\n"
        "checkpoint:\n  every: 2\n  keep_last: 0\n"
        "logging:\n  tensorboard: false\n  progress_bar: false\n"
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "training.train",
        "--config",
        str(config),
        "--output-dir",
        str(output),
        "--tokenizer",
        str(workspace["tokenizer"]),
        "--max-steps",
        "4",
        "--batch-size",
        "1",
        "--mixed-precision",
        "no",
        *extra,
    ]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600, check=False
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished


def test_two_processes_train_checkpoint_once_and_resume_exactly(tmp_path: Path) -> None:
    workspace = write_training_workspace(tmp_path / "data")
    full = _run_two_ranks(workspace, tmp_path / "full")
    checkpoints = tmp_path / "full" / "checkpoints"
    assert sorted(folder.name for folder in checkpoints.iterdir()) == ["step-000002", "step-000004"]
    state = checkpoints / "step-000004" / "training_state"
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()
    assert full.stderr.count("finished at step 4") == 2  # both ranks ran to the end

    # The main process's weights load in the engine, in both formats, and agree.
    from_pkl = load_restorer_weights(checkpoints / "step-000004" / "fidesr.pkl")
    from_safetensors = load_restorer_weights(checkpoints / "step-000004" / "fidesr.safetensors")
    assert from_pkl.lora["unet"].rank == from_safetensors.lora["unet"].rank == 4
    for pkl_state, safetensors_state in (
        (from_pkl.lora["unet"].state, from_safetensors.lora["unet"].state),
        (from_pkl.lrrb_state, from_safetensors.lrrb_state),
    ):
        assert pkl_state.keys() == safetensors_state.keys()
        assert all(pkl_state[name].equal(safetensors_state[name]) for name in pkl_state)

    # Two fresh processes resuming from step 2 end where the uninterrupted pair ended.
    _run_two_ranks(workspace, tmp_path / "resumed", "--resume", str(checkpoints / "step-000002"))
    expected = load_file(state / "trainable.safetensors")
    resumed = load_file(
        tmp_path / "resumed" / "checkpoints" / "step-000004" / "training_state" / "trainable.safetensors"
    )
    assert expected.keys() == resumed.keys() and len(expected) > 0
    for name, tensor in expected.items():
        assert (resumed[name] - tensor).abs().max() <= 1e-6, name
    start = load_file(checkpoints / "step-000002" / "training_state" / "trainable.safetensors")
    assert any((start[name] - tensor).abs().max() > 1e-6 for name, tensor in expected.items())  # it trained
