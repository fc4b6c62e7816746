"""The command line with PiSA-SR and OSEDiff weights: family detected from ``--weights``, strengths, prompt, info, convert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_export import write_diffusers_folder
from PIL import Image

from fidesr_core.app import cli
from fidesr_core.loading.base_model import load_base_model
from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.loading.weights import load_restorer_weights, save_restorer_weights
from fidesr_core.networks.tiny import tiny_base_model, tiny_osediff_weights, tiny_pisa_sr_weights
from fidesr_core.pipeline import upscale
from fidesr_core.settings import UpscaleSettings


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("families")
    base = tiny_base_model(seed=3)
    save_restorer_weights(tiny_pisa_sr_weights(base, seed=4), folder / "pisa_sr.pkl")
    save_restorer_weights(tiny_osediff_weights(base, seed=5), folder / "osediff.safetensors")
    write_diffusers_folder(base, folder / "sd21-tiny")
    image = folder / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(image)
    return {
        "base": folder / "sd21-tiny",
        "pisa": folder / "pisa_sr.pkl",
        "osediff": folder / "osediff.safetensors",
        "image": image,
    }


def _run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _upscale(capsys, files: dict, weights: str, output: Path, *extra: str) -> tuple[int, str, str]:
    args = ["upscale", files["image"], "-o", output, "--base", files["base"], "--weights", files[weights]]
    args += ["--precision", "fp32", "--device", "cpu", "--latent-mode", "mode", *extra]
    return _run(capsys, *args)


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def _engine_png(files: dict, weights: str, settings: UpscaleSettings, prompt: str = "") -> np.ndarray:
    model = assemble_restorer(
        load_base_model(files["base"]),
        load_restorer_weights(files[weights]),
        prompt=prompt,
        precision="fp32",
        device="cpu",
    )
    image = torch.from_numpy(np.asarray(Image.open(files["image"]).convert("RGB"), dtype=np.float32) / 255.0)
    with torch.no_grad():
        output = upscale(model, image.permute(2, 0, 1)[None], settings)
    return (output[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)


def test_pisa_sr_default_and_adjustable_modes(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = _upscale(capsys, files, "pisa", tmp_path / "default")
    assert code == 0, err
    assert out.startswith("PiSA-SR on cpu (fp32,")
    code, _, err = _upscale(
        capsys, files, "pisa", tmp_path / "adjustable", "--pixel-strength", "0.4", "--semantic-strength", "1.5"
    )
    assert code == 0, err
    default, adjustable = _png(tmp_path / "default" / "photo.png"), _png(tmp_path / "adjustable" / "photo.png")
    assert default.shape == adjustable.shape == (80, 96, 3)
    assert np.abs(default - adjustable).max() > 2
    expected = _engine_png(
        files, "pisa", UpscaleSettings(latent_mode="mode", pixel_strength=0.4, semantic_strength=1.5)
    )
    assert np.abs(adjustable - expected).max() <= 1


def test_osediff_with_a_prompt(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = _upscale(capsys, files, "osediff", tmp_path / "plain")
    assert code == 0 and out.startswith("OSEDiff on cpu"), err
    code, _, err = _upscale(capsys, files, "osediff", tmp_path / "prompted", "--prompt", "a stone bridge")
    assert code == 0, err
    plain, prompted = _png(tmp_path / "plain" / "photo.png"), _png(tmp_path / "prompted" / "photo.png")
    assert np.abs(plain - prompted).max() > 0
    expected = _engine_png(files, "osediff", UpscaleSettings(latent_mode="mode"), prompt="a stone bridge")
    assert np.abs(prompted - expected).max() <= 1


def test_strengths_are_refused_for_a_family_with_one_lora_set(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = _upscale(capsys, files, "osediff", tmp_path / "x", "--pixel-strength", "0.5")
    assert code == 2 and "PiSA-SR" in err and "OSEDiff" in err and str(files["osediff"]) in err


def test_info_and_convert(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "info", files["pisa"], "--json")
    description = json.loads(out)
    assert code == 0 and description["family"] == "PiSA-SR" and description["semantic_lora"]["rank"] == 2
    converted = tmp_path / "pisa_sr.safetensors"
    assert _run(capsys, "convert", files["pisa"], converted)[0] == 0
    code, out, _ = _run(capsys, "info", converted)
    assert code == 0 and "PiSA-SR" in out and "pisa-sr-weights" in out
    back = tmp_path / "osediff.pkl"
    assert _run(capsys, "convert", files["osediff"], back)[0] == 0
    written = torch.load(back, weights_only=True)
    assert {"rank_unet", "rank_vae", "state_dict_vae", "vae_lora_encoder_modules"} <= set(written)
    code, out, _ = _run(capsys, "doctor", "--weights", back)
    assert "weights" in out and "OSEDiff" in out
