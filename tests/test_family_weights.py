"""PiSA-SR and OSEDiff weights files: the authors' .pkl layouts, our .safetensors form, and the files that are refused.

Checkpoints are built on the fly in the authors' layouts (``family_fixtures``); every refusal
must name the file and what is missing or wrong.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from family_fixtures import osediff_checkpoint, pisa_sr_checkpoint
from safetensors import safe_open
from weights_fixtures import authors_checkpoint

from fidesr_core.errors import WeightsFileError
from fidesr_core.loading.identify import identify_model_file
from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.loading.weights import (
    convert_restorer_weights,
    describe_restorer_weights,
    load_restorer_weights,
    save_restorer_weights,
)
from fidesr_core.networks.model import BaseModel
from fidesr_core.networks.tiny import TINY_UNET_CONFIG, tiny_base_model


@pytest.fixture(scope="module")
def pisa(tiny: BaseModel) -> dict:
    return pisa_sr_checkpoint(tiny, rank_pix=4, rank_sem=2)


@pytest.fixture(scope="module")
def osediff(tiny: BaseModel) -> dict:
    return osediff_checkpoint(tiny, rank_unet=4, rank_vae=2)


def _save(checkpoint: dict, path: Path) -> Path:
    torch.save(checkpoint, path)
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(WeightsFileError) as caught:
        load_restorer_weights(path)
    message = str(caught.value)
    assert str(path) in message
    return message


def _same_tensors(left: dict, right: dict) -> None:
    assert set(left) == set(right)
    for key in left:
        assert torch.equal(left[key], right[key]), key


# --------------------------------------------------------------------------- reading the authors' files


def test_pisa_sr_pkl_loads_as_two_sets(pisa: dict, tmp_path: Path) -> None:
    weights = load_restorer_weights(_save(pisa, tmp_path / "pisa_sr.pkl"))
    pixel, semantic = weights.lora["pixel"], weights.lora["semantic"]
    assert weights.family == "pisa-sr" and weights.file_format == "pkl" and set(weights.lora) == {"pixel", "semantic"}
    assert (pixel.rank, semantic.rank) == (4, 2)
    assert pixel.target_modules["default_encoder_pix"] == pisa["unet_lora_encoder_modules_pix"]
    assert all("_pix." in key for key in pixel.state) and all("_sem." in key for key in semantic.state)
    _same_tensors(pixel.state | semantic.state, pisa["state_dict_unet"])


def test_osediff_pkl_loads_with_conv_in_and_vae_lora(osediff: dict, tmp_path: Path) -> None:
    weights = load_restorer_weights(_save(osediff, tmp_path / "osediff.pkl"))
    unet_lora, vae_lora = weights.lora["unet"], weights.lora["vae_encoder"]
    assert weights.family == "osediff" and weights.file_format == "pkl"
    assert (unet_lora.rank, vae_lora.rank) == (4, 2)
    assert set(weights.conv_in_state) == {"weight", "bias"}
    assert torch.equal(weights.conv_in_state["weight"], osediff["state_dict_unet"]["conv_in.base_layer.weight"])
    assert "conv_in.lora_A.default_encoder.weight" in unet_lora.state  # conv_in carries a LoRA too
    assert vae_lora.target_modules["default_encoder"] == osediff["vae_lora_encoder_modules"]
    _same_tensors(vae_lora.state, osediff["state_dict_vae"])


def test_fidesr_files_go_through_the_fidesr_reader(tmp_path: Path) -> None:
    weights = load_restorer_weights(_save(authors_checkpoint(), tmp_path / "fidesr.pkl"))
    assert weights.family == "fidesr" and set(weights.lora) == {"unet"} and weights.lrrb_state


@pytest.mark.parametrize("family", ["pisa", "osediff"])
def test_round_trip_pkl_safetensors_pkl(family: str, pisa: dict, osediff: dict, tmp_path: Path) -> None:
    """pkl -> safetensors -> pkl gives back the authors' dict exactly (their scripts read our .pkl)."""
    authors = pisa if family == "pisa" else osediff
    source = _save(authors, tmp_path / "authors.pkl")
    convert_restorer_weights(source, tmp_path / "ours.safetensors")
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["fidesr.format"] == ("pisa-sr-weights" if family == "pisa" else "osediff-weights")
    assert metadata["fidesr.format_version"] == "1" and metadata["converted_from"] == "authors.pkl"
    again = load_restorer_weights(tmp_path / "ours.safetensors")
    assert again.file_format == "safetensors" and again.metadata["converted_from"] == "authors.pkl"
    save_restorer_weights(again, tmp_path / "back.pkl")
    written = torch.load(tmp_path / "back.pkl", weights_only=True)
    assert set(written) == set(authors)
    for key, value in authors.items():
        if isinstance(value, dict):
            _same_tensors(written[key], value)
        else:
            assert written[key] == value, key


def test_half_precision_and_metadata_are_kept(pisa: dict, tmp_path: Path) -> None:
    weights = load_restorer_weights(_save(pisa, tmp_path / "pisa_sr.pkl"))
    weights.lora["pixel"].state = {k: v.half() for k, v in weights.lora["pixel"].state.items()}
    weights.metadata["note"] = "fp16 pixel set"
    save_restorer_weights(weights, tmp_path / "half.safetensors")
    again = load_restorer_weights(tmp_path / "half.safetensors")
    assert {v.dtype for v in again.lora["pixel"].state.values()} == {torch.float16}
    assert {v.dtype for v in again.lora["semantic"].state.values()} == {torch.float32}
    assert again.metadata == {"note": "fp16 pixel set"}


def test_describe(pisa: dict, osediff: dict, tmp_path: Path) -> None:
    pisa_info = describe_restorer_weights(load_restorer_weights(_save(pisa, tmp_path / "p.pkl")))
    assert pisa_info["family"] == "PiSA-SR" and pisa_info["format"].startswith("pkl")
    assert pisa_info["pixel_lora"]["rank"] == 4 and pisa_info["semantic_lora"]["rank"] == 2
    assert pisa_info["pixel_lora"]["parameters"] > 0
    osediff_info = describe_restorer_weights(load_restorer_weights(_save(osediff, tmp_path / "o.pkl")))
    assert osediff_info["family"] == "OSEDiff" and osediff_info["vae_encoder_lora"]["rank"] == 2
    conv_in = [osediff["state_dict_unet"][f"conv_in.base_layer.{name}"] for name in ("weight", "bias")]
    assert osediff_info["conv_in_parameters"] == sum(tensor.numel() for tensor in conv_in)
    # duplicates in the released VAE list count once
    assert osediff_info["vae_encoder_lora"]["modules"]["default_encoder"] == len(
        set(osediff["vae_lora_encoder_modules"])
    )
    json.dumps(pisa_info, default=str), json.dumps(osediff_info, default=str)


# --------------------------------------------------------------------------- refusals


def test_pisa_sr_file_with_a_set_missing(pisa: dict, tmp_path: Path) -> None:
    no_semantic = {k: v for k, v in pisa.items() if not k.endswith("_sem")}
    no_semantic["state_dict_unet"] = {k: v for k, v in pisa["state_dict_unet"].items() if "_pix." in k}
    message = _refusal(_save(no_semantic, tmp_path / "no_sem.pkl"))
    assert "PiSA-SR" in message and "the semantic LoRA set is missing" in message and "lora_rank_unet_sem" in message

    no_pixel = {k: v for k, v in pisa.items() if not k.endswith("_pix")}
    message = _refusal(_save(no_pixel, tmp_path / "no_pix.pkl"))
    assert "pixel LoRA set" in message and "unet_lora_encoder_modules_pix" in message

    no_semantic_tensors = dict(pisa, state_dict_unet=no_semantic["state_dict_unet"])
    message = _refusal(_save(no_semantic_tensors, tmp_path / "no_sem_tensors.pkl"))
    assert "semantic LoRA set is missing" in message and "default_encoder_sem" in message


def test_osediff_file_without_its_vae_lora(osediff: dict, tmp_path: Path) -> None:
    no_vae = {k: v for k, v in osediff.items() if k not in ("rank_vae", "vae_lora_encoder_modules", "state_dict_vae")}
    message = _refusal(_save(no_vae, tmp_path / "no_vae.pkl"))
    assert "OSEDiff" in message and "the VAE encoder LoRA is missing" in message and "state_dict_vae" in message

    empty_vae = dict(osediff, state_dict_vae={})
    message = _refusal(_save(empty_vae, tmp_path / "empty_vae.pkl"))
    assert "VAE encoder LoRA is missing" in message

    no_conv_in = dict(osediff)
    no_conv_in["state_dict_unet"] = {k: v for k, v in osediff["state_dict_unet"].items() if "base_layer" not in k}
    assert "conv_in is missing" in _refusal(_save(no_conv_in, tmp_path / "no_conv_in.pkl"))


@pytest.mark.parametrize(
    ("family", "key", "expected"),
    [
        ("pisa", "lora_rank_unet_pix", "the pixel LoRA set: LoRA tensor"),
        ("pisa", "lora_rank_unet_sem", "the semantic LoRA set: LoRA tensor"),
        ("osediff", "rank_unet", "the U-Net LoRA: LoRA tensor"),
        ("osediff", "rank_vae", "the VAE encoder LoRA: LoRA tensor"),
    ],
)
def test_ranks_that_disagree_with_the_tensors(
    family: str, key: str, expected: str, pisa: dict, osediff: dict, tmp_path: Path
) -> None:
    checkpoint = dict(pisa if family == "pisa" else osediff)
    checkpoint[key] = checkpoint[key] + 3
    message = _refusal(_save(checkpoint, tmp_path / "bad_rank.pkl"))
    assert expected in message and f"expected rank {checkpoint[key]}" in message


def test_stray_tensors_and_damaged_values(pisa: dict, osediff: dict, tmp_path: Path) -> None:
    stray = copy.copy(pisa)
    stray["state_dict_unet"] = dict(pisa["state_dict_unet"], **{"conv_in.lora_A.default_other.weight": torch.ones(1)})
    assert "belongs to none of the adapters" in _refusal(_save(stray, tmp_path / "stray.pkl"))
    nan = copy.copy(osediff)
    first = next(iter(osediff["state_dict_vae"]))
    nan["state_dict_vae"] = dict(
        osediff["state_dict_vae"], **{first: torch.full_like(osediff["state_dict_vae"][first], float("nan"))}
    )
    assert "NaN or infinite" in _refusal(_save(nan, tmp_path / "nan.pkl"))


def test_our_safetensors_with_a_newer_version(pisa: dict, tmp_path: Path) -> None:
    weights = load_restorer_weights(_save(pisa, tmp_path / "pisa_sr.pkl"))
    save_restorer_weights(weights, tmp_path / "ours.safetensors")
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata(), **{"fidesr.format_version": "2"})
    import safetensors.torch

    safetensors.torch.save_file(tensors, tmp_path / "newer.safetensors", metadata=metadata)
    assert "version '2'" in _refusal(tmp_path / "newer.safetensors")


def test_each_file_is_unpickled_once(
    pisa: dict, osediff: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Telling the family and reading the weights share one weights-only unpickling."""
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or real_load(*args, **kwargs))
    for name, checkpoint in (("fidesr", authors_checkpoint()), ("pisa", pisa), ("osediff", osediff)):
        calls.clear()
        load_restorer_weights(_save(checkpoint, tmp_path / f"{name}.pkl"))
        assert len(calls) == 1 and calls[0]["weights_only"] is True, name


def test_weights_that_do_not_fit_the_base_model(pisa: dict, tmp_path: Path) -> None:
    """A PiSA-SR LoRA on a U-Net of other sizes: refused at assembly, naming the file."""
    path = _save(pisa, tmp_path / "pisa_sr.pkl")
    weights = load_restorer_weights(path)
    weights.metadata["path"] = str(path)
    other = tiny_base_model(seed=0)
    config = dict(TINY_UNET_CONFIG, block_out_channels=(8, 16), norm_num_groups=4)
    from diffusers import UNet2DConditionModel

    other.unet = UNet2DConditionModel(**config).eval()
    with pytest.raises(WeightsFileError) as caught:
        assemble_restorer(other, weights, precision="fp32", device="cpu")
    assert str(path) in str(caught.value) and "pixel LoRA set" in str(caught.value)


@pytest.mark.parametrize("suffix", [".pkl", ".safetensors"])
def test_identification_says_which_family(pisa: dict, osediff: dict, tmp_path: Path, suffix: str) -> None:
    for name, checkpoint, family in (("pisa_sr", pisa, "pisa-sr-weights"), ("osediff", osediff, "osediff-weights")):
        source = _save(checkpoint, tmp_path / f"{name}.pkl")
        path = source if suffix == ".pkl" else tmp_path / f"{name}.safetensors"
        if suffix == ".safetensors":
            convert_restorer_weights(source, path)
        identity = identify_model_file(path)
        assert identity.family == family and not identity.is_sd2
