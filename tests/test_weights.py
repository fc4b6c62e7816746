"""FiDeSR weights files: reading the authors' pkl and our safetensors, round trips, conversion and writing.

Every file is built here on the fly from tiny random models; the authors' pkl is
written the way their trainer names things (docs/algorithm.md §5, §6), with the key names
spelled out in weights_fixtures.py rather than taken from the module under test.
Refusals of bad files and validation live in test_weights_refusals.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from weights_fixtures import RANK, authors_checkpoint, with_header_length_low_byte
from weights_fixtures import weights_from_checkpoint as _weights

from fidesr_core.errors import SettingsError, WeightsFileError
from fidesr_core.loading.weights import (
    convert_restorer_weights,
    describe_restorer_weights,
    load_restorer_weights,
    save_restorer_weights,
)
from fidesr_core.networks.lora import RELEASED_LORA_ALPHA, add_lora_adapters, load_lora_state, merge_lora
from fidesr_core.networks.lrrb import LRRB
from fidesr_core.networks.model import BaseModel
from fidesr_core.networks.tiny import TINY_UNET_CONFIG

AUTHORS_KEYS = {
    "unet_lora_encoder_modules",
    "unet_lora_decoder_modules",
    "unet_lora_others_modules",
    "lora_rank_unet",
    "state_dict_unet",
    "lrrb_state_dict",
}


@pytest.fixture(scope="module")
def authors() -> dict:
    return authors_checkpoint()


@pytest.fixture()
def authors_pkl(authors: dict, tmp_path: Path) -> Path:
    path = tmp_path / "fidesr.pkl"
    torch.save(authors, path)
    return path


def _same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype and torch.equal(left[k], right[k]) for k in left
    )


# --------------------------------------------------------------------------- reading and round trips


def test_authors_pkl_loads_unchanged(authors: dict, authors_pkl: Path) -> None:
    weights = load_restorer_weights(authors_pkl)
    assert weights.file_format == "pkl" and weights.metadata == {}
    assert weights.lora["unet"].rank == RANK
    assert weights.lora["unet"].target_modules["default_encoder"] == authors["unet_lora_encoder_modules"]
    assert weights.lora["unet"].target_modules["default_decoder"] == authors["unet_lora_decoder_modules"]
    assert weights.lora["unet"].target_modules["default_others"] == authors["unet_lora_others_modules"]
    assert all(
        authors[key] for key in ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")
    )
    assert _same_tensors(weights.lora["unet"].state, authors["state_dict_unet"])
    assert _same_tensors(weights.lrrb_state, dict(authors["lrrb_state_dict"]))
    assert sum(v.numel() for v in weights.lrrb_state.values()) == 720_260  # docs/algorithm.md §3


def test_legacy_torch_save_and_content_detection(authors: dict, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pkl"
    torch.save(authors, legacy, _use_new_zipfile_serialization=False)
    assert _same_tensors(load_restorer_weights(legacy).lora["unet"].state, authors["state_dict_unet"])
    # The content decides, not the extension.
    pkl_named_safetensors = tmp_path / "really_a_pickle.safetensors"
    torch.save(authors, pkl_named_safetensors)
    assert load_restorer_weights(pkl_named_safetensors).file_format == "pkl"
    safetensors_named_pkl = tmp_path / "really_safetensors.pkl"
    save_restorer_weights(_weights(authors), safetensors_named_pkl, file_format="safetensors")
    assert load_restorer_weights(safetensors_named_pkl).file_format == "safetensors"


def test_round_trip_pkl_safetensors_pkl(authors_pkl: Path, tmp_path: Path) -> None:
    original = load_restorer_weights(authors_pkl)
    middle = convert_restorer_weights(authors_pkl, tmp_path / "fidesr.safetensors")
    assert middle is not original
    via_safetensors = load_restorer_weights(tmp_path / "fidesr.safetensors")
    assert via_safetensors.file_format == "safetensors"
    assert via_safetensors.metadata == {"converted_from": "fidesr.pkl"}
    convert_restorer_weights(tmp_path / "fidesr.safetensors", tmp_path / "again.pkl")
    again = load_restorer_weights(tmp_path / "again.pkl")
    for weights in (via_safetensors, again):
        assert weights.lora["unet"].rank == original.lora["unet"].rank
        assert weights.lora["unet"].target_modules == original.lora["unet"].target_modules
        assert _same_tensors(weights.lora["unet"].state, original.lora["unet"].state)
        assert _same_tensors(weights.lrrb_state, original.lrrb_state)


@pytest.mark.parametrize("suffix", [".pkl", ".safetensors"])
def test_half_precision_is_kept(authors: dict, tmp_path: Path, suffix: str) -> None:
    weights = _weights(authors)
    weights.lora["unet"].state = {k: v.half() for k, v in weights.lora["unet"].state.items()}  # LRRB stays fp32
    save_restorer_weights(weights, tmp_path / f"half{suffix}")
    loaded = load_restorer_weights(tmp_path / f"half{suffix}")
    assert _same_tensors(loaded.lora["unet"].state, weights.lora["unet"].state)
    assert _same_tensors(loaded.lrrb_state, weights.lrrb_state)
    assert describe_restorer_weights(loaded)["dtypes"] == "float16, float32"


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_written_pkl_is_the_authors_layout_and_loads_their_way(authors: dict, tmp_path: Path) -> None:
    path = tmp_path / "ours.pkl"
    save_restorer_weights(_weights(authors), path)
    raw = torch.load(path, weights_only=True, map_location="cpu")
    assert set(raw) == AUTHORS_KEYS
    assert type(raw["lora_rank_unet"]) is int and raw["lora_rank_unet"] == RANK
    assert all(type(raw[k]) is list for k in AUTHORS_KEYS if k.endswith("_modules"))
    # Their test script: three LoraConfigs from the lists, copy every "lora" parameter by name, load the LRRB.
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    for adapter, key in (
        ("default_encoder", "unet_lora_encoder_modules"),
        ("default_decoder", "unet_lora_decoder_modules"),
        ("default_others", "unet_lora_others_modules"),
    ):
        unet.add_adapter(LoraConfig(r=raw["lora_rank_unet"], target_modules=raw[key]), adapter_name=adapter)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora" in name:
                parameter.copy_(raw["state_dict_unet"][name])
    LRRB().load_state_dict(raw["lrrb_state_dict"])
    assert _same_tensors({k: v for k, v in unet.state_dict().items() if "lora" in k}, authors["state_dict_unet"])


def test_safetensors_layout(authors: dict, tmp_path: Path) -> None:
    path = tmp_path / "fidesr.safetensors"
    save_restorer_weights(_weights(authors), path)
    with safe_open(str(path), framework="pt") as handle:
        metadata, names = handle.metadata(), set(handle.keys())
    assert metadata["fidesr.format"] == "fidesr-weights"
    assert metadata["fidesr.format_version"] == "1"
    assert metadata["fidesr.lora_rank"] == str(RANK)
    assert json.loads(metadata["fidesr.unet_lora_encoder_modules"]) == authors["unet_lora_encoder_modules"]
    assert json.loads(metadata["fidesr.unet_lora_others_modules"]) == authors["unet_lora_others_modules"]
    assert metadata["source"] == "test" and metadata["training_step"] == "1200"
    assert names == {"unet_lora." + k for k in authors["state_dict_unet"]} | {
        "lrrb." + k for k in authors["lrrb_state_dict"]
    }
    assert load_restorer_weights(path).metadata == {"source": "test", "training_step": "1200"}


@pytest.mark.parametrize("suffix", [".pkl", ".safetensors"])
def test_loaded_tensors_do_not_depend_on_the_file(authors: dict, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"fidesr{suffix}"
    save_restorer_weights(_weights(authors), path)
    weights = load_restorer_weights(path)
    path.write_bytes(b"")  # truncates the same inode: a tensor still mapped from it would fault when read
    assert _same_tensors(weights.lora["unet"].state, authors["state_dict_unet"])
    assert _same_tensors(weights.lrrb_state, dict(authors["lrrb_state_dict"]))


@pytest.mark.usefixtures("one_thread")
def test_safetensors_is_told_by_its_layout_whatever_the_header_length(authors: dict, tmp_path: Path) -> None:
    """The header length's low byte is the file's first byte: 0x80 (the pickle marker) must not make it a pickle."""
    written = tmp_path / "written.safetensors"
    save_restorer_weights(_weights(authors), written)
    expected = load_restorer_weights(written)
    for low_byte in range(256):
        path = with_header_length_low_byte(written, tmp_path / f"fidesr-{low_byte}.weights", low_byte)
        assert path.read_bytes()[0] == low_byte
        weights = load_restorer_weights(path)  # no suffix to go by: the content decides
        assert weights.file_format == "safetensors", low_byte
        assert _same_tensors(weights.lora["unet"].state, expected.lora["unet"].state), low_byte
        path.unlink()


def test_merge_is_peft_merging_every_lora_layer(tiny: BaseModel, authors: dict) -> None:
    """merge_lora (diffusers' public fuse_lora + unload_lora) gives bit for bit what merging each peft LoRA
    layer and putting its base layer back gives."""
    from peft.tuners.lora import LoraLayer

    weights = _weights(authors)

    def with_lora() -> UNet2DConditionModel:
        unet = UNet2DConditionModel.from_config(tiny.unet.config).eval()
        unet.load_state_dict(tiny.unet.state_dict())
        add_lora_adapters(
            unet, weights.lora["unet"].target_modules, rank=weights.lora["unet"].rank, init_lora_weights=False
        )
        load_lora_state(unet, weights.lora["unet"].state)
        return unet

    by_layer = with_lora()
    for name, module in list(by_layer.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(by_layer.get_submodule(parent) if parent else by_layer, child, module.get_base_layer())
    merged = with_lora()
    merge_lora(merged)
    expected, got = by_layer.state_dict(), merged.state_dict()
    assert got.keys() == expected.keys() and not any("lora" in key for key in got)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    assert not torch.equal(got["conv_in.weight"], tiny.unet.state_dict()["conv_in.weight"])


def test_loaded_lora_changes_the_unet_and_merging_matches_peft(tiny: BaseModel, authors_pkl: Path) -> None:
    weights = load_restorer_weights(authors_pkl)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, TINY_UNET_CONFIG["cross_attention_dim"], generator=generator)
    unet = UNet2DConditionModel.from_config(tiny.unet.config).eval()
    unet.load_state_dict(tiny.unet.state_dict())
    with torch.no_grad():
        plain = unet(latent, 1, encoder_hidden_states=context).sample
        add_lora_adapters(
            unet, weights.lora["unet"].target_modules, rank=weights.lora["unet"].rank, init_lora_weights=False
        )
        load_lora_state(unet, weights.lora["unet"].state)
        with_peft = unet(latent, 1, encoder_hidden_states=context).sample
        merge_lora(unet)
        merged = unet(latent, 1, encoder_hidden_states=context).sample
    assert not any("lora" in name for name in unet.state_dict())
    assert (with_peft - plain).abs().max() > 1e-2
    torch.testing.assert_close(merged, with_peft, atol=1e-5, rtol=0)


def test_lora_alpha_follows_the_released_code_and_round_trips(authors: dict, tmp_path: Path) -> None:
    """The authors' files carry no alpha and their code uses peft's default 8 (scale 8 / rank)."""
    torch.save(authors, tmp_path / "a.pkl")
    assert load_restorer_weights(tmp_path / "a.pkl").lora["unet"].alpha == RELEASED_LORA_ALPHA == 8
    weights = _weights(authors)
    weights.lora["unet"].alpha = 3.5
    save_restorer_weights(weights, tmp_path / "b.safetensors")
    assert load_restorer_weights(tmp_path / "b.safetensors").lora["unet"].alpha == 3.5
    with pytest.raises(SettingsError, match="no LoRA alpha"):
        save_restorer_weights(weights, tmp_path / "b.pkl")
    assert not (tmp_path / "b.pkl").exists()


def test_lora_alpha_scales_the_merged_delta(tiny: BaseModel, authors: dict) -> None:
    weights = _weights(authors)

    def merged_delta(alpha: float) -> torch.Tensor:
        unet = UNet2DConditionModel.from_config(tiny.unet.config).eval()
        unet.load_state_dict(tiny.unet.state_dict())
        add_lora_adapters(
            unet,
            weights.lora["unet"].target_modules,
            rank=weights.lora["unet"].rank,
            alpha=alpha,
            init_lora_weights=False,
        )
        load_lora_state(unet, weights.lora["unet"].state)
        merge_lora(unet)
        return unet.conv_in.weight.detach() - tiny.unet.conv_in.weight.detach()

    small, large = merged_delta(4.0), merged_delta(12.0)
    assert small.abs().max() > 1e-4
    torch.testing.assert_close(large, 3.0 * small, rtol=1e-4, atol=1e-6)


def test_describe(authors_pkl: Path) -> None:
    description = describe_restorer_weights(load_restorer_weights(authors_pkl))
    raw = torch.load(authors_pkl, weights_only=True)
    assert description["family"] == "FiDeSR" and description["format"].startswith("pkl")
    lora = description["unet_lora"]
    assert lora["rank"] == RANK and lora["alpha"] == 8
    assert lora["modules"] == {
        "default_encoder": len(raw["unet_lora_encoder_modules"]),
        "default_decoder": len(raw["unet_lora_decoder_modules"]),
        "default_others": len(raw["unet_lora_others_modules"]),
    }
    # Each module holds A [r, in(, k, k)] and B [out, r(, 1, 1)]; counted from the file's raw tensors.
    assert lora["parameters"] == sum(t.numel() for t in raw["state_dict_unet"].values()) > 0
    assert description["lrrb_parameters"] == 720_260
    assert description["dtypes"] == "float32"
    assert description["metadata"] == {}
    json.dumps(description)  # the CLI's --json output


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize(("suffix", "writer"), [(".safetensors", "safetensors"), (".pkl", "torch")])
def test_failed_save_leaves_no_partial_file(
    authors: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, writer: str
) -> None:
    def write_half_then_fail(*args: object, **kwargs: object) -> None:
        target = next(a for a in args if isinstance(a, (str, os.PathLike)))
        Path(target).write_bytes(b"\x00" * 1000)  # a partial file is on disk when the writer dies
        raise OSError("disk full")

    path = tmp_path / f"fidesr{suffix}"
    save_restorer_weights(_weights(authors), path)
    before = path.read_bytes()
    if writer == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    else:
        monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_restorer_weights(_weights(authors), path)
    with pytest.raises(OSError, match="disk full"):
        save_restorer_weights(_weights(authors), tmp_path / f"new{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"fidesr{suffix}"]
    assert path.read_bytes() == before


def test_save_refuses_bad_format_requests(authors: dict, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"\.txt"):
        save_restorer_weights(_weights(authors), tmp_path / "fidesr.txt")
    with pytest.raises(SettingsError, match="ckpt2"):
        save_restorer_weights(_weights(authors), tmp_path / "fidesr.bin", file_format="ckpt2")  # type: ignore[arg-type]
    weights = _weights(authors)
    weights.metadata["fidesr.format"] = "mine"
    with pytest.raises(SettingsError, match="reserved"):
        save_restorer_weights(weights, tmp_path / "fidesr.safetensors")
    weights = _weights(authors)
    weights.lrrb_state.popitem()
    with pytest.raises(WeightsFileError, match="LRRB"):
        save_restorer_weights(weights, tmp_path / "fidesr.pkl")
    assert not list(tmp_path.iterdir())
