"""Runtime dependencies: inference needs no training-only package, and the two dependency lists agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_UPSCALE_WITHOUT_KORNIA = """
import sys
sys.modules["kornia"] = None  # any import of kornia now fails
import torch
from fidesr_core.app import cli, doctor
from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights
from fidesr_core.pipeline import upscale
from fidesr_core.settings import UpscaleSettings

torch.set_num_threads(1)
base = tiny_base_model()
model = assemble_restorer(base, tiny_fidesr_weights(base), precision="fp32", device="cpu")
image = upscale(model, torch.rand(1, 3, 16, 16), UpscaleSettings(process_size=64))
assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
print("upscaled without kornia")
"""


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower() for requirement in requirements}


def test_inference_runs_without_kornia() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _UPSCALE_WITHOUT_KORNIA], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "upscaled without kornia" in done.stdout, done.stderr[-3000:]


def test_kornia_is_a_training_dependency_and_the_runtime_lists_agree() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _names(project["dependencies"])
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert _names([line for line in lines if line.strip() and not line.startswith("#")]) == runtime
    assert "kornia" not in runtime and "kornia" in _names(project["optional-dependencies"]["train"])
    assert {"accelerate", "safetensors", "diffusers", "peft"} <= runtime
