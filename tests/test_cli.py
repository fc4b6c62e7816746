"""The command line (``python -m fidesr_core``) on tiny models written to disk.

The ``upscale`` runs happen in-process through ``cli.main`` (one model load per
call, so the file stays fast); one test runs the real ``python -m fidesr_core``
to prove the entry point and the exit code of a bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_export import write_config_folder, write_diffusers_folder, write_ldm_checkpoint
from PIL import Image

from fidesr_core.app import cli
from fidesr_core.loading.base_model import load_base_model
from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.loading.weights import load_restorer_weights, save_restorer_weights
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights
from fidesr_core.pipeline import upscale
from fidesr_core.settings import UpscaleSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    base = tiny_base_model(seed=3)
    weights = tiny_fidesr_weights(base, seed=4)
    save_restorer_weights(weights, folder / "fidesr.pkl")
    write_diffusers_folder(base, folder / "sd21-tiny")
    return {"base": folder / "sd21-tiny", "weights": folder / "fidesr.pkl", "folder": folder}


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = 127 + 90 * np.sin(xx / 4.0)[..., None] * np.cos(yy / 5.0)[..., None] * np.ones(3)
    return np.clip(smooth + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def _run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _upscale_args(model_files: dict[str, Path], *inputs: Path, output: Path) -> list[str | Path]:
    return [
        "upscale",
        *inputs,
        "-o",
        output,
        "--base",
        model_files["base"],
        "--weights",
        model_files["weights"],
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--latent-mode",
        "mode",
    ]


def test_upscale_handles_every_kind_of_input(model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(_photo(20, 28)).save(inputs / "rgb.png")
    Image.fromarray(_photo(20, 28)[..., 0]).save(inputs / "grey.jpg", quality=90)
    rgba = np.dstack([_photo(12, 16), np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (12, 1))])
    Image.fromarray(rgba).save(inputs / "rgba.png")
    Image.fromarray((np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 130).astype(np.uint16)).save(
        inputs / "sixteen.png"
    )
    Image.fromarray(_photo(1, 1)).save(inputs / "dot.webp", lossless=True)
    Image.fromarray(_photo(7, 13)).save(inputs / "odd.png")
    (inputs / "notes.png").write_text("not an image")
    good = (inputs / "rgb.png").read_bytes()
    (inputs / "cut.png").write_bytes(good[: len(good) // 2])
    output = tmp_path / "out"

    code, out, err = _run(capsys, *_upscale_args(model_files, inputs, output=output))

    assert code == 1  # two bad files: reported, the rest written
    expected = {
        "rgb": (112, 80),
        "grey": (112, 80),
        "rgba": (64, 48),
        "sixteen": (96, 80),
        "dot": (4, 4),
        "odd": (52, 28),
    }
    for name, size in expected.items():
        with Image.open(output / f"{name}.png") as image:
            assert image.size == size, name
            array = np.asarray(image)
            assert image.mode == ("RGBA" if name == "rgba" else "RGB")
            assert np.isfinite(array).all()
    with Image.open(output / "rgba.png") as image:
        alpha = np.asarray(image)[..., 3]
    assert alpha[:, 0].mean() < 30 and alpha[:, -1].mean() > 225  # the alpha ramp survived the upscale
    assert not (output / "notes.png").exists() and not (output / "cut.png").exists()
    assert "written 6, skipped 0 (exist), failed 2" in out
    assert "notes.png: not an image" in err and "cut.png" in err
    assert not list(output.glob(".*part"))  # no temporary files left


def test_existing_outputs_are_skipped_and_overwrite_redoes(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "a.png"
    Image.fromarray(_photo(16, 16)).save(source)
    output = tmp_path / "out"
    output.mkdir()
    Image.fromarray(_photo(4, 4)).save(output / "a.png")  # a complete PNG from an earlier run
    old = (output / "a.png").read_bytes()
    code, out, _ = _run(capsys, *_upscale_args(model_files, source, output=output))
    assert code == 0 and "nothing to do" in out and (output / "a.png").read_bytes() == old
    code, out, _ = _run(capsys, *_upscale_args(model_files, source, output=output), "--overwrite")
    assert code == 0 and "written 1" in out
    with Image.open(output / "a.png") as image:
        assert image.size == (64, 64)


def test_interrupt_leaves_no_half_written_file(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "a.png"
    Image.fromarray(_photo(16, 16)).save(source)
    output = tmp_path / "out"

    def interrupted_save(self: Image.Image, target: str, *args: object, **kwargs: object) -> None:
        Path(target).write_bytes(b"\x89PNG half")  # part of the file is on disk when Ctrl-C lands
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    code, _, err = _run(capsys, *_upscale_args(model_files, source, output=output))
    assert code == 130 and "interrupted" in err
    assert list(output.iterdir()) == []


def test_clashing_outputs_and_missing_files_are_one_line_errors(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    Image.fromarray(_photo(8, 8)).save(tmp_path / "a.png")
    Image.fromarray(_photo(8, 8)).save(tmp_path / "a.jpg")
    code, _, err = _run(
        capsys, *_upscale_args(model_files, tmp_path / "a.png", tmp_path / "a.jpg", output=tmp_path / "o")
    )
    assert code == 2 and "would both be written to" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, *_upscale_args(model_files, tmp_path / "missing.png", output=tmp_path / "o"))
    assert code == 2 and "missing.png: no such file or folder" in err
    args = _upscale_args(model_files, tmp_path / "a.png", output=tmp_path / "o")
    args[args.index("--base") + 1] = model_files["weights"]  # weights given as the base model
    code, _, err = _run(capsys, *args)
    assert code == 2 and "FiDeSR weights" in err and len(err.strip().splitlines()) == 1


def test_convert_and_info(model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    converted = tmp_path / "fidesr.safetensors"
    code, out, _ = _run(capsys, "convert", model_files["weights"], converted)
    assert code == 0 and converted.is_file()
    back = tmp_path / "back.pkl"
    assert _run(capsys, "convert", converted, back)[0] == 0
    original, round_trip = load_restorer_weights(model_files["weights"]), load_restorer_weights(back)
    lora, lora_back = original.lora["unet"].state, round_trip.lora["unet"].state
    assert all(torch.equal(lora[k], lora_back[k]) for k in lora)
    code, out, _ = _run(capsys, "info", converted, "--json")
    description = json.loads(out)
    assert code == 0 and description["unet_lora"]["rank"] == 2 and description["lrrb_parameters"] == 720_260
    code, out, _ = _run(capsys, "info", model_files["weights"])
    assert code == 0 and "unet_lora" in out and "pkl" in out
    code, _, err = _run(capsys, "info", model_files["base"] / "unet" / "config.json")
    assert code == 2 and "error:" in err


def test_doctor_runs_the_tiny_pipeline_and_identifies_files(model_files: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "doctor", "--base", model_files["base"], "--weights", model_files["weights"])
    assert code == 0, out
    assert "torch" in out and "diffusers" in out and "pipeline     ok" in out and "all good" in out
    assert "usable as the FiDeSR base" in out
    code, out, _ = _run(capsys, "doctor", "--base", model_files["weights"])  # weights are not a base model
    assert code == 1 and "NOT usable" in out and "problems found" in out


def test_single_file_and_folder_bases_give_identical_outputs(tmp_path: Path) -> None:
    base = tiny_base_model(seed=5)
    weights = tiny_fidesr_weights(base, seed=6)
    folder = write_diffusers_folder(base, tmp_path / "folder")
    single = write_ldm_checkpoint(base, tmp_path / "tiny.safetensors")
    config = write_config_folder(base, tmp_path / "config")
    image = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(7))
    settings = UpscaleSettings(latent_mode="sample", seed=3)
    outputs = []
    for loaded in (load_base_model(folder), load_base_model(single, config_dir=config)):
        model = assemble_restorer(loaded, weights, precision="fp32", device="cpu")
        outputs.append(upscale(model, image, settings))
    assert torch.equal(outputs[0], outputs[1])


def test_module_entry_point_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("hello")
    done = subprocess.run(
        [sys.executable, "-m", "fidesr_core", "info", str(tmp_path / "fake.png")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "fake.png" in done.stderr
