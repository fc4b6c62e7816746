"""Every setting reaches the code that uses it: through ``upscale()`` and through the ``fidesr`` command.

For each field of ``UpscaleSettings`` (and of the LF / HF settings) and each flag of ``fidesr
upscale``, a spy sits on the function that uses the value (the tiled decoder's budget, the
tiler's tile size, the colour fix's method, ...).  The engine runs once with the defaults and
once with the one value changed; the spy must receive the changed value, and receive something
different from the default run.  A field or flag missing from the tables fails the coverage test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fidesr_core import pipeline
from fidesr_core.app import cli
from fidesr_core.app.upscale_command import SETTING_FLAGS
from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.networks.tiny import tiny_base_model, tiny_pisa_sr_weights
from fidesr_core.ops import injection, preprocess, restoration, vae_codec
from fidesr_core.settings import HighFrequencySettings, LowFrequencySettings, UpscaleSettings
from fidesr_core.tiled_vae import codec

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
Extract = Callable[[tuple, dict], Any]


def _arg(index: int, name: str) -> Extract:
    return lambda args, kwargs: kwargs[name] if name in kwargs else args[index]


def _mib(cap: int | None) -> int | None:
    return None if cap is None else cap >> 20


# Where each setting is used: (module, function, what the call received), for the changed value.
SPIES: dict[str, tuple[Any, str, Extract]] = {
    "upscale_by": (pipeline, "prepare_lq", lambda a, k: k["upscale_by"]),
    "process_size": (pipeline, "prepare_lq", lambda a, k: k["process_size"]),
    "latent_mode": (pipeline, "encode_image", lambda a, k: k["latent_mode"]),
    "seed": (vae_codec, "latent_noise", _arg(1, "seed")),
    "color_fix": (preprocess, "apply_color_fix", _arg(2, "method")),
    "tile_size": (restoration, "run_tiled", lambda a, k: k["tile_size"]),
    "tile_overlap": (restoration, "run_tiled", lambda a, k: k["overlap"]),
    "encode_tile_size": (codec, "encode_moments", lambda a, k: k["tile_size"]),
    "decode_tile_size": (codec, "decode_latents", lambda a, k: k["tile_size"]),
    "vae_memory_mb": (codec, "decode_latents", lambda a, k: _mib(k["budget"].map_bytes)),
    "vae_memory_mb (encode)": (codec, "encode_moments", lambda a, k: _mib(k["budget"].map_bytes)),
    "pixel_strength": (restoration, "unet_passes", _arg(1, "pixel")),
    "semantic_strength": (restoration, "unet_passes", _arg(2, "semantic")),
    "lf.strength": (pipeline, "low_frequency_delta", lambda a, k: a[3].strength),
    "lf.gamma": (pipeline, "low_frequency_delta", lambda a, k: a[3].gamma),
    "lf.cutoff": (injection, "butterworth_lowpass", lambda a, k: k["cutoff"]),
    "lf.order": (injection, "butterworth_lowpass", lambda a, k: k["order"]),
    "lf.filter": (injection, "butterworth_lowpass", lambda a, k: k["geometry"]),
    "lf.channel_tau": (injection, "channel_gate", lambda a, k: k["tau"]),
    "lf.channel_sharpness": (injection, "channel_gate", lambda a, k: k["sharpness"]),
    "hf.strength": (pipeline, "high_frequency_delta", lambda a, k: a[3].strength),
    "hf.gamma": (pipeline, "high_frequency_delta", lambda a, k: a[3].gamma),
    "hf.cutoff": (injection, "butterworth_highpass", lambda a, k: k["cutoff"]),
    "hf.order": (injection, "butterworth_highpass", lambda a, k: k["order"]),
    "hf.filter": (injection, "butterworth_highpass", lambda a, k: k["geometry"]),
    "hf.channel_cutoff": (injection, "channel_gate", lambda a, k: k["cutoff"]),
    "hf.channel_order": (injection, "channel_gate", lambda a, k: k["order"]),
    "hf.channel_tau": (injection, "channel_gate", lambda a, k: k["tau"]),
    "hf.channel_sharpness": (injection, "channel_gate", lambda a, k: k["sharpness"]),
}
# A changed value for each setting (valid with the others at their defaults, and with process_size 64).
CHANGED: dict[str, Any] = {
    "upscale_by": 2.0,
    "process_size": 128,
    "latent_mode": "mode",
    "seed": 5,
    "color_fix": "wavelet",
    "tile_size": 48,
    "tile_overlap": 8,
    "encode_tile_size": 512,
    "decode_tile_size": 16,
    "vae_memory_mb": 7,
    "pixel_strength": 0.5,
    "semantic_strength": 1.5,
    "lf.strength": 0.3,
    "lf.gamma": 1.5,
    "lf.cutoff": 0.2,
    "lf.order": 3,
    "lf.filter": "radial",
    "lf.channel_tau": 0.5,
    "lf.channel_sharpness": 4.0,
    "hf.strength": 0.3,
    "hf.gamma": 1.5,
    "hf.cutoff": 0.2,
    "hf.order": 3,
    "hf.filter": "radial",
    "hf.channel_cutoff": 0.2,
    "hf.channel_order": 3,
    "hf.channel_tau": 0.5,
    "hf.channel_sharpness": 4.0,
}


def _setting_names() -> set[str]:
    names = {item.name for item in dataclasses.fields(UpscaleSettings)} - {"lf", "hf"}
    for prefix, kind in (("lf.", LowFrequencySettings), ("hf.", HighFrequencySettings)):
        names |= {prefix + item.name for item in dataclasses.fields(kind)}
    return names


def test_every_setting_has_a_spy_and_a_changed_value() -> None:
    assert {key.split(" ")[0] for key in SPIES} == _setting_names() == set(CHANGED)
    assert {setting for _, setting, _ in SETTING_FLAGS} <= _setting_names()


def _settings(setting: str | None, value: Any = None, **base: Any) -> UpscaleSettings:
    base = {"process_size": 64, **base}
    if setting is None:
        return UpscaleSettings(**base)
    owner, _, name = setting.rpartition(".")
    if owner:
        kind = LowFrequencySettings if owner == "lf" else HighFrequencySettings
        return UpscaleSettings(**base, **{owner: kind(**{name: value})})
    return UpscaleSettings(**(base | {name: value}))


def _spy(monkeypatch: pytest.MonkeyPatch, key: str) -> list[Any]:
    module, name, extract = SPIES[key]
    real, received = getattr(module, name), []

    def spy(*args: Any, **kwargs: Any) -> Any:
        received.append(extract(args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return received


@pytest.fixture(scope="module")
def tiny_pisa_sr():
    base = tiny_base_model(seed=1)
    return assemble_restorer(base, tiny_pisa_sr_weights(base, seed=4), precision="fp32", device="cpu")


@pytest.mark.parametrize("key", list(SPIES))
def test_each_setting_reaches_the_code_that_uses_it(key, tiny_model, tiny_pisa_sr, monkeypatch) -> None:
    setting = key.split(" ")[0]
    model = tiny_pisa_sr if "strength" in setting and "." not in setting else tiny_model
    image = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    received = _spy(monkeypatch, key)
    with torch.inference_mode():
        pipeline.upscale(model, image, _settings(None))
        default = list(received)
        received.clear()
        pipeline.upscale(model, image, _settings(setting, CHANGED[setting]))
    # the LF and HF branches share kernels (channel gate, low-pass): the other branch's value may arrive too
    assert CHANGED[setting] in received and CHANGED[setting] not in default, (received, default)


# ------------------------------------------------------------------ the command line

FLAG_SETTING = {flag: setting for flag, setting, _ in SETTING_FLAGS}


def _auto_is_not(precision: str) -> bool:
    from fidesr_core.precision import resolve_dtype

    return resolve_dtype("auto", torch.device("cpu")) != resolve_dtype(precision, torch.device("cpu"))


_OTHER_PRECISION = "fp32" if _auto_is_not("fp32") else "bf16"  # a precision that "auto" does not pick here
# Flags that are not settings: (module, function, what it received, the flag's words, what it must receive).
OTHER_FLAGS: dict[str, tuple[Any, str, Extract, tuple[str, ...], Any]] = {
    "--prompt": ("transformers", "CLIPTextModel.forward", lambda a, k: k["input_ids"][0, 2].item(), ("--prompt", "a brick wall"), None),
    "--precision": (pipeline, "predict_residual", lambda a, k: a[0].dtype, ("--precision", _OTHER_PRECISION), None),
    "--max-image-pixels": ("fidesr_core.app.batch", "load_image", lambda a, k: k["max_pixels"], ("--max-image-pixels", "100000"), 100000),
    "--recursive": ("fidesr_core.app.upscale_command", "plan_outputs", lambda a, k: k["recursive"], ("--recursive",), True),
    "--overwrite": ("fidesr_core.app.upscale_command", "pending", lambda a, k: k["overwrite"], ("--overwrite",), True),
    "--device": ("fidesr_core.loading.restorer", "assemble_restorer", lambda a, k: str(k["device"]), ("--device", "cpu"), "cpu"),
}  # fmt: skip


def test_every_upscale_flag_is_tested() -> None:
    parser = cli.build_parser("fidesr")
    upscale = next(action for action in parser._subparsers._actions if action.dest == "command").choices["upscale"]
    flags = {action.option_strings[-1] for action in upscale._actions if action.option_strings}
    assert flags - {"--help", "--verbose", "--output", "--base", "--weights"} == set(FLAG_SETTING) | set(OTHER_FLAGS)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / "a.png")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / "sub" / "b.png")
    return folder


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory, tiny) -> dict[str, Path]:
    """A tiny SD 2.1 diffusers folder with FiDeSR and PiSA-SR weights for it."""
    from ldm_export import write_diffusers_folder

    from fidesr_core.loading.weights import save_restorer_weights
    from fidesr_core.networks.tiny import tiny_fidesr_weights

    folder = tmp_path_factory.mktemp("models")
    write_diffusers_folder(tiny, folder / "sd21-tiny")
    save_restorer_weights(tiny_fidesr_weights(tiny, seed=4), folder / "fidesr.pkl")
    save_restorer_weights(tiny_pisa_sr_weights(tiny, seed=4), folder / "pisa_sr.pkl")
    return {"base": folder / "sd21-tiny", "weights": folder / "fidesr.pkl", "pisa_sr": folder / "pisa_sr.pkl"}


def _spy_on(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, extract: Extract) -> list[Any]:
    owner_name, _, attribute = name.rpartition(".")
    if isinstance(module, str):
        import importlib

        module = importlib.import_module(module)
    owner = getattr(module, owner_name) if owner_name else module
    real, received = getattr(owner, attribute), []

    def spy(*args: Any, **kwargs: Any) -> Any:
        received.append(extract(args[1:] if owner_name else args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, spy)
    return received


def _run_twice(model_files, photos, tmp_path, weights: Path, received: list, words: tuple[str, ...]):
    def fidesr(output: Path, *extra: str) -> None:
        command = ["upscale", str(photos), "-o", str(output), "--base", str(model_files["base"])]
        assert cli.main([*command, "--weights", str(weights), *extra]) == 0

    fidesr(tmp_path / "default")
    default = list(received)
    received.clear()
    fidesr(tmp_path / "changed", *words)
    return default, list(received)


@pytest.mark.parametrize("flag", sorted(FLAG_SETTING) + sorted(OTHER_FLAGS))
def test_each_flag_reaches_the_code_that_uses_it(flag, model_files, photo_folder, tmp_path, monkeypatch) -> None:
    weights = model_files["weights"]
    if flag in FLAG_SETTING:
        setting = FLAG_SETTING[flag]
        received, expected = _spy(monkeypatch, setting), CHANGED[setting]
        words = (flag, str(expected))
        if setting.endswith("_strength") and "." not in setting:
            weights = model_files["pisa_sr"]  # PiSA-SR's strengths: the other families refuse them
    else:
        module, name, extract, words, expected = OTHER_FLAGS[flag]
        received = _spy_on(monkeypatch, module, name, extract)
    default, changed = _run_twice(model_files, photo_folder, tmp_path, weights, received, words)
    assert changed and changed != default, (flag, default, changed)
    if expected is not None:
        assert expected in changed and expected not in default, (flag, default, changed)
