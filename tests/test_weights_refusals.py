"""FiDeSR weights files that are refused: missing, truncated, corrupt, unsafe or foreign files, and validation.

Every file is built here on the fly from tiny random models (weights_fixtures.py
builds the authors' checkpoint dict); each refusal must name the file and the
problem. Reading, round trips and writing live in test_weights.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from ldm_export import write_diffusers_folder, write_ldm_checkpoint
from safetensors import safe_open
from weights_fixtures import RANK, authors_checkpoint
from weights_fixtures import weights_from_checkpoint as _weights

from fidesr_core.errors import WeightsFileError
from fidesr_core.loading.weights import load_restorer_weights, save_restorer_weights, validate_weights
from fidesr_core.networks.families import RestorerWeights
from fidesr_core.networks.model import BaseModel


@pytest.fixture(scope="module")
def authors() -> dict:
    return authors_checkpoint()


def _refusal(path: Path) -> str:
    with pytest.raises(WeightsFileError) as caught:
        load_restorer_weights(path)
    message = str(caught.value)
    assert str(path) in message
    return message


# --------------------------------------------------------------------------- refusals


def test_missing_empty_and_garbage_files(tmp_path: Path) -> None:
    assert "does not exist" in _refusal(tmp_path / "nowhere.pkl")
    (tmp_path / "empty.pkl").write_bytes(b"")
    assert "empty" in _refusal(tmp_path / "empty.pkl")
    (tmp_path / "notes.pkl").write_text("these are not weights")
    assert "cannot be read as a PyTorch file" in _refusal(tmp_path / "notes.pkl")
    (tmp_path / "notes.txt").write_text("these are not weights")
    assert "not a model file this loader reads" in _refusal(tmp_path / "notes.txt")
    (tmp_path / "folder").mkdir()
    assert "folder" in _refusal(tmp_path / "folder")


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_truncated_files(authors: dict, tmp_path: Path, kind: str) -> None:
    whole = tmp_path / ("whole.safetensors" if kind == "safetensors" else "whole.pkl")
    if kind == "safetensors":
        save_restorer_weights(_weights(authors), whole)
    else:
        torch.save(authors, whole, _use_new_zipfile_serialization=kind == "zip")
    data = whole.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        cut_path = tmp_path / f"cut{cut}{whole.suffix}"
        cut_path.write_bytes(data[:cut])
        message = _refusal(cut_path)
        assert "truncated" in message or "damaged" in message


def test_corrupt_files(authors: dict, tmp_path: Path) -> None:
    st_path = tmp_path / "fidesr.safetensors"
    save_restorer_weights(_weights(authors), st_path)
    data = bytearray(st_path.read_bytes())
    data[20:40] = b"\xff" * 20  # inside the JSON header
    st_path.write_bytes(bytes(data))
    assert "damaged" in _refusal(st_path)
    legacy = tmp_path / "legacy.pkl"
    torch.save(authors, legacy, _use_new_zipfile_serialization=False)
    data = bytearray(legacy.read_bytes())
    data[2:12] = b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a"  # garbage opcodes right after the pickle header
    legacy.write_bytes(bytes(data))
    assert "damaged" in _refusal(legacy)


class _CreatesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_that_runs_code_is_refused_without_running(tmp_path: Path, writer: str) -> None:
    # The payload is live: an unrestricted unpickle creates its marker.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_CreatesMarker(control), protocol=2)).close()
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    payload = {"lora_rank_unet": _CreatesMarker(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    message = _refusal(path)
    assert not marker.exists()
    assert "contains code or Python objects that we refuse to load" in message


def test_dict_with_other_keys(authors: dict, tmp_path: Path) -> None:
    path = tmp_path / "extra.pkl"
    torch.save({**authors, "optimizer": {"lr": torch.tensor(5e-5)}}, path)
    message = _refusal(path)
    assert "optimizer" in message and "lrrb_state_dict" in message
    torch.save([authors["lora_rank_unet"]], tmp_path / "list.pkl")
    assert "list" in _refusal(tmp_path / "list.pkl")


def test_a_pisa_sr_checkpoint_is_read_as_pisa_sr(authors: dict, tmp_path: Path) -> None:
    """One reader for the three families: the content, not the caller, says which."""
    lora = authors["state_dict_unet"]
    pisa = {"lora_rank_unet_pix": RANK, "lora_rank_unet_sem": RANK, "state_dict_unet": {}}
    for kind in ("pix", "sem"):
        for part in ("encoder", "decoder", "others"):
            pisa[f"unet_lora_{part}_modules_{kind}"] = authors[f"unet_lora_{part}_modules"]
        pisa["state_dict_unet"].update(
            {
                k.replace("_encoder.", f"_encoder_{kind}.")
                .replace("_decoder.", f"_decoder_{kind}.")
                .replace("_others.", f"_others_{kind}."): v
                for k, v in lora.items()
            }
        )
    torch.save(pisa, tmp_path / "pisa_sr.pkl")
    weights = load_restorer_weights(tmp_path / "pisa_sr.pkl")
    assert weights.family == "pisa-sr" and set(weights.lora) == {"pixel", "semantic"} and not weights.lrrb_state


def test_osediff_checkpoint(authors: dict, tmp_path: Path) -> None:
    osediff = {
        "unet_lora_encoder_modules": authors["unet_lora_encoder_modules"],
        "unet_lora_decoder_modules": authors["unet_lora_decoder_modules"],
        "unet_lora_others_modules": authors["unet_lora_others_modules"],
        "rank_unet": RANK,
        "rank_vae": RANK,
        "vae_lora_encoder_modules": ["encoder.conv_in"],
        "state_dict_unet": authors["state_dict_unet"],
        "state_dict_vae": {"encoder.conv_in.lora_A.default_encoder.weight": torch.zeros(RANK, 3, 3, 3)},
    }
    torch.save(osediff, tmp_path / "osediff.pkl")
    message = _refusal(tmp_path / "osediff.pkl")  # its VAE LoRA has no lora_B and it has no conv_in
    assert "OSEDiff weights: the VAE encoder LoRA" in message and "has no tensor lora_B" in message


@pytest.mark.parametrize("form", ["safetensors", "ckpt", "diffusers folder"])
def test_base_model_given_as_weights(tiny: BaseModel, tmp_path: Path, form: str) -> None:
    if form == "diffusers folder":
        path = write_diffusers_folder(tiny, tmp_path / "sd21")
    else:
        path = write_ldm_checkpoint(tiny, tmp_path / f"v2-1_512.{form}")
    message = _refusal(path)
    assert "is a base model" in message and "base model input" in message


def test_safetensors_without_our_marker(authors: dict, tmp_path: Path) -> None:
    path = tmp_path / "someone_elses.safetensors"
    tensors = {"unet_lora." + k: v.contiguous() for k, v in authors["state_dict_unet"].items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    message = _refusal(path)
    assert "without our format marker (fidesr.format)" in message and "looks like FiDeSR weights" in message


def test_missing_lrrb(authors: dict, tmp_path: Path) -> None:
    no_lrrb = {k: v for k, v in authors.items() if k != "lrrb_state_dict"}
    torch.save(no_lrrb, tmp_path / "no_lrrb.pkl")
    assert "the LRRB is missing" in _refusal(tmp_path / "no_lrrb.pkl")
    torch.save({**authors, "lrrb_state_dict": {}}, tmp_path / "empty_lrrb.pkl")
    assert "the LRRB is missing" in _refusal(tmp_path / "empty_lrrb.pkl")
    # Our format, marker and all, without the lrrb.* tensors.
    path = tmp_path / "no_lrrb.safetensors"
    save_restorer_weights(_weights(authors), path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("lrrb.")}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    assert "the LRRB is missing" in _refusal(path)


def test_our_safetensors_with_a_newer_version_or_stray_tensors(authors: dict, tmp_path: Path) -> None:
    path = tmp_path / "fidesr.safetensors"
    save_restorer_weights(_weights(authors), path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, "fidesr.format_version": "2"})
    assert "version '2'" in _refusal(path)
    safetensors.torch.save_file({**tensors, "optimizer.step": torch.zeros(1)}, str(path), metadata=metadata)
    assert "optimizer.step" in _refusal(path)
    safetensors.torch.save_file(
        tensors, str(path), metadata={k: v for k, v in metadata.items() if k != "fidesr.lora_rank"}
    )
    assert "fidesr.lora_rank" in _refusal(path)


@pytest.mark.parametrize(
    ("where", "value", "dtype"),
    [
        ("state_dict_unet", "nan", torch.float32),
        ("lrrb_state_dict", "nan", torch.float32),
        ("state_dict_unet", "inf", torch.float16),
        ("lrrb_state_dict", "-inf", torch.bfloat16),
    ],
)
def test_nan_and_infinite_tensors(authors: dict, tmp_path: Path, where: str, value: str, dtype: torch.dtype) -> None:
    broken = {**authors, where: {k: v.to(dtype, copy=True) for k, v in authors[where].items()}}
    name = sorted(broken[where])[-1]
    broken[where][name].view(-1)[-1] = float(value)
    torch.save(broken, tmp_path / "broken.pkl")
    message = _refusal(tmp_path / "broken.pkl")
    assert "NaN or infinite" in message and name in message
    del broken[where][name]  # the same file without the bad tensor is refused for another reason
    assert "NaN" not in str(pytest.raises(WeightsFileError, validate_weights, _weights(broken)).value)


# --------------------------------------------------------------------------- validation


def _broken(authors: dict, change: str) -> RestorerWeights:
    weights = _weights(authors)
    lora = weights.lora["unet"].state
    first_a = next(k for k in lora if ".lora_A.default_encoder." in k)
    module = first_a.split(".lora_A.")[0]
    if change == "adapter":
        weights.lora["unet"].target_modules["default_extra"] = weights.lora["unet"].target_modules.pop("default_others")
    elif change == "unlisted":
        weights.lora["unet"].target_modules["default_encoder"].remove(module)
    elif change == "no lora_B":
        del lora[first_a.replace(".lora_A.", ".lora_B.")]
    elif change == "rank":
        weights.lora["unet"].rank = RANK + 1
    elif change == "lrrb shape":
        weights.lrrb_state["in_conv.weight"] = torch.zeros(64, 6, 1, 1)
    elif change == "bad name":
        lora["down_blocks.0.resnets.0.conv1.lora_up.weight"] = torch.zeros(RANK, RANK)
    return weights


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("adapter", "expected exactly"),
        ("unlisted", "not in the default_encoder module list"),
        ("no lora_B", "has no tensor"),
        ("rank", "expected rank"),
        ("lrrb shape", "expected (64, 8, 1, 1)"),
        ("bad name", "is not named"),
    ],
)
def test_validation_names_the_source_and_the_problem(authors: dict, change: str, expected: str) -> None:
    validate_weights(_weights(authors), source="fine.pkl")
    with pytest.raises(WeightsFileError) as caught:
        validate_weights(_broken(authors, change), source="my/fidesr.pkl")
    assert str(caught.value).startswith("my/fidesr.pkl: ")
    assert expected in str(caught.value)


def test_validation_of_a_file_with_an_unlisted_module(authors: dict, tmp_path: Path) -> None:
    changed = {**authors, "unet_lora_encoder_modules": authors["unet_lora_encoder_modules"][1:]}
    torch.save(changed, tmp_path / "fidesr.pkl")
    assert "not in the default_encoder module list" in _refusal(tmp_path / "fidesr.pkl")
