"""Offline SD 2.1-base loading: bundled configs, diffusers folders, single .safetensors/.ckpt files, reading files.

Every test runs with the network cut off (sockets and the Hub's download
functions raise and record), without HF_HUB_OFFLINE, and with tiny random
SD 2-shaped models written to tmp_path. Identification of model files and the
refusal of every unusable input live in test_base_model_refusals.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
from ldm_export import ldm_state_dict, write_config_folder, write_diffusers_folder, write_ldm_checkpoint

from fidesr_core.errors import BaseModelError, ModelFileError
from fidesr_core.loading import files
from fidesr_core.loading.base_model import SD21_BASE_CONFIG_DIR, load_base_model
from fidesr_core.loading.clip_tokenizer import BUNDLED_TOKENIZER_DIR
from fidesr_core.loading.files import load_pickle, read_header, read_tensors, state_dict_tensors
from fidesr_core.loading.identify import identify_model_file
from fidesr_core.networks.model import BaseModel
from fidesr_core.networks.tiny import TINY_TEXT_CONFIG

# Every test runs with the network cut off.
pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def tiny_config_dir(tiny: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_folder(tiny, tmp_path_factory.mktemp("tiny_config"))


def assert_same_weights(original: torch.nn.Module, loaded: torch.nn.Module, *, dtype: torch.dtype | None = None):
    expected, got = original.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        value = value.to(dtype).float() if dtype is not None and value.is_floating_point() else value
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def assert_loaded_properly(model: BaseModel) -> None:
    for module in (model.unet, model.vae, model.text_encoder):
        assert not module.training
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            assert tensor.device.type == "cpu", name
            assert not tensor.requires_grad, name
            if tensor.is_floating_point():
                assert tensor.dtype == torch.float32, name


@torch.no_grad()
def assert_same_outputs(original: BaseModel, loaded: BaseModel) -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [0] * 72])  # [1, 77]
    text_a = original.text_encoder(ids).last_hidden_state
    text_b = loaded.text_encoder(ids).last_hidden_state
    assert torch.equal(text_a, text_b)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    out_a = original.unet(latent, 1, encoder_hidden_states=text_a).sample
    out_b = loaded.unet(latent, 1, encoder_hidden_states=text_b).sample
    assert torch.equal(out_a, out_b)
    image = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    assert torch.equal(original.vae.encode(image).latent_dist.mode(), loaded.vae.encode(image).latent_dist.mode())
    assert torch.equal(original.vae.decode(latent).sample, loaded.vae.decode(latent).sample)


# --------------------------------------------------------------------------- bundled configs


def test_bundled_sd21_configs_build_the_published_sizes_on_meta() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SD21_BASE_CONFIG_DIR, subfolder="unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_BASE_CONFIG_DIR, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD21_BASE_CONFIG_DIR, subfolder="text_encoder"))
    counts = [round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for m in (unet, vae, text_encoder)]
    assert counts == [865.9, 83.7, 340.4]  # docs/algorithm.md §1
    assert all(p.device.type == "meta" for m in (unet, vae, text_encoder) for p in m.parameters())
    assert unet.config.cross_attention_dim == 1024 and unet.config.sample_size == 64
    assert text_encoder.config.num_hidden_layers == 23 and text_encoder.config.hidden_size == 1024
    assert (
        json.loads((SD21_BASE_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
        == "epsilon"
    )


# --------------------------------------------------------------------------- successful loads


@pytest.mark.parametrize("with_index", [True, False])
def test_diffusers_folder_loads_identical_model(tiny: BaseModel, tmp_path: Path, with_index: bool) -> None:
    folder = write_diffusers_folder(tiny, tmp_path / "sd21")
    if not with_index:
        (folder / "model_index.json").unlink()
        shutil.copytree(BUNDLED_TOKENIZER_DIR, folder / "tokenizer")  # prompts use the folder's own tokenizer
    loaded = load_base_model(folder)
    assert loaded.kind == "diffusers folder" and loaded.source == str(folder)
    assert loaded.tokenizer_dir == str(BUNDLED_TOKENIZER_DIR if with_index else folder / "tokenizer")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(tiny, name), getattr(loaded, name))
    assert_loaded_properly(loaded)
    assert_same_outputs(tiny, loaded)


def test_network_guard_is_active(no_network: list[str]) -> None:
    import huggingface_hub

    with pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("huggingface.co", 443))
    with pytest.raises(AssertionError, match="network access attempted"):
        huggingface_hub.hf_hub_download("stabilityai/stable-diffusion-2-1-base", "model_index.json")
    assert no_network == ["socket.create_connection", "huggingface_hub.hf_hub_download"]
    no_network.clear()


def test_diffusers_folder_in_older_layouts_loads(tiny: BaseModel, tmp_path: Path) -> None:
    """fp16-variant U-Net, .bin text encoder with transformers-4 names, VAE with pre-0.14 attention names."""
    from safetensors.torch import load_file, save_file

    folder = write_diffusers_folder(tiny, tmp_path / "old")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(
        {k: v.half() for k, v in load_file(unet_file).items()},
        folder / "unet" / "diffusion_pytorch_model.fp16.safetensors",
    )
    unet_file.unlink()
    text_file = folder / "text_encoder" / "model.safetensors"
    text_state = {f"text_model.{k}": v for k, v in load_file(text_file).items()}
    text_state["text_model.embeddings.position_ids"] = torch.arange(77).expand(1, -1)
    torch.save(text_state, folder / "text_encoder" / "pytorch_model.bin")
    text_file.unlink()
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    vae_state = {}
    for key, value in load_file(vae_file).items():
        for new, old in renames.items():
            key = key.replace(new, old) if ".attentions." in key else key
        vae_state[key] = value
    assert any(".proj_attn." in key for key in vae_state)
    save_file(vae_state, vae_file)

    loaded = load_base_model(folder)
    assert_loaded_properly(loaded)
    assert_same_weights(tiny.unet, loaded.unet, dtype=torch.float16)
    assert_same_weights(tiny.vae, loaded.vae)
    assert_same_weights(tiny.text_encoder, loaded.text_encoder)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_identical_model(tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path, suffix: str) -> None:
    path = write_ldm_checkpoint(tiny, tmp_path / f"tiny-sd21{suffix}")
    loaded = load_base_model(path, config_dir=tiny_config_dir)
    assert loaded.kind == f"single file ({suffix})" and loaded.source == str(path)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(tiny, name), getattr(loaded, name))
    assert_loaded_properly(loaded)
    assert_same_outputs(tiny, loaded)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_half_precision_checkpoint_loads_as_float32(
    tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path, suffix: str
) -> None:
    path = write_ldm_checkpoint(tiny, tmp_path / f"tiny-fp16{suffix}", dtype=torch.float16)
    loaded = load_base_model(path, config_dir=tiny_config_dir)
    assert_loaded_properly(loaded)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(tiny, name), getattr(loaded, name), dtype=torch.float16)


def test_the_unused_last_text_block_does_not_matter(tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path) -> None:
    state = ldm_state_dict(tiny)
    last = f"cond_stage_model.model.transformer.resblocks.{TINY_TEXT_CONFIG['num_hidden_layers']}."
    assert any(key.startswith(last) for key in state)  # like real SD 2 files: one block more than used
    changed = {key: (value * 7 + 1 if key.startswith(last) else value) for key, value in state.items()}
    loaded = load_base_model(
        write_ldm_checkpoint(tiny, tmp_path / "a.safetensors", state=changed), config_dir=tiny_config_dir
    )
    assert_same_weights(tiny.text_encoder, loaded.text_encoder)


def test_768_file_name_loads_with_a_note(
    tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_ldm_checkpoint(tiny, tmp_path / "v2-1_768-ema-pruned.safetensors")
    identity = identify_model_file(path)
    assert identity.is_sd2 and identity.family == "sd2"
    assert any("768-v" in note for note in identity.notes)
    with caplog.at_level("WARNING", logger="fidesr_core.loading.base_model"):
        load_base_model(path, config_dir=tiny_config_dir)
    assert "768-v" in caplog.text


def test_bundled_config_refuses_a_file_of_another_layout(tiny: BaseModel, tmp_path: Path) -> None:
    path = write_ldm_checkpoint(tiny, tmp_path / "small.safetensors")
    with pytest.raises(
        BaseModelError, match=r"small\.safetensors: the text encoder cannot be loaded \(\S+ expected shape .*2\.1-base"
    ):
        load_base_model(path)  # bundled SD 2.1-base configs


def test_config_of_other_widths_is_refused_naming_the_shape(tiny: BaseModel, tmp_path: Path) -> None:
    config_dir = write_config_folder(tiny, tmp_path / "wider")
    unet_config = json.loads((config_dir / "unet" / "config.json").read_text())
    (config_dir / "unet" / "config.json").write_text(json.dumps({**unet_config, "block_out_channels": [24, 48]}))
    path = write_ldm_checkpoint(tiny, tmp_path / "narrow.ckpt")
    with pytest.raises(
        BaseModelError, match=r"narrow\.ckpt: the U-Net cannot be loaded \(\S+ expected shape torch\.Size\(\[\d+"
    ):
        load_base_model(path, config_dir=config_dir)


# --------------------------------------------------------------------------- reading files


def test_reading_a_pickle_unwraps_nesting(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"state_dict": tensors, "note": "x"}, "global_step": 5}, path)
    header, loaded = read_header(path)
    assert header.shapes == {"a.weight": (3, 2), "b": (4,)} and header.top_keys == {"state_dict", "global_step"}
    read = state_dict_tensors(loaded)
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], v) for k, v in tensors.items())
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="holds a list"):
        read_header(tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    assert identify_model_file(tmp_path / "meta.pt").description == "a file without tensors"
    with pytest.raises(BaseModelError, match="meta.pt looks like a file without tensors"):
        load_base_model(tmp_path / "meta.pt")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_executing_pickle_is_refused_without_running(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.ones(2), "x": _Evil(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(BaseModelError, match=r"evil\.ckpt .*(refused|not a readable)") as caught:
        load_base_model(path)
    if writer == "torch.save":
        assert "posix.system" in str(caught.value) or "nt.system" in str(caught.value)
    with pytest.raises(ModelFileError):
        load_pickle(path, mmap=False)
    with pytest.raises(ModelFileError):
        identify_model_file(path)
    assert not marker.exists()


def test_identification_reads_only_the_safetensors_header(
    tiny: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors
    import safetensors.torch

    path = write_ldm_checkpoint(tiny, tmp_path / "model.safetensors")
    real_open = safetensors.safe_open
    opened: list[str] = []

    class HeaderOnly:
        """safetensors' reader that refuses to hand out tensor data."""

        def __init__(self, *args, **kwargs) -> None:
            self.handle = real_open(*args, **kwargs)
            opened.append(str(args[0]))

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def metadata(self):
            return self.inner.metadata()

        def get_slice(self, key: str):
            shape = self.inner.get_slice(key).get_shape()
            return type("ShapeOnly", (), {"get_shape": lambda self: shape})()

        def get_tensor(self, key: str):
            raise AssertionError("tensor data read")

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(safetensors, "safe_open", HeaderOnly)
    for owner, name in (
        (safetensors.torch, "load_file"),
        (torch, "load"),
        (files, "read_tensors"),
        (files, "load_pickle"),
    ):
        monkeypatch.setattr(owner, name, no_tensor_reads)
    identity = identify_model_file(path)
    assert (identity.family, identity.container, identity.is_sd2) == ("sd2", "safetensors", True)
    assert opened == [str(path)]  # the header was read, by the library


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_weights_own_their_memory(
    tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path, suffix: str
) -> None:
    """A single file is read once into memory: weights never point into the file (mmap), each owns its storage,
    aligned for any dtype (16 bytes). A diffusers folder's weights are what ``from_pretrained`` hands over."""
    path = write_ldm_checkpoint(tiny, tmp_path / f"m{suffix}")
    loaded = load_base_model(path, config_dir=tiny_config_dir)
    for module in (loaded.unet, loaded.vae, loaded.text_encoder):
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            assert tensor.data_ptr() % 16 == 0, (suffix, name)
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), (suffix, name)
    with open(path, "r+b") as handle:
        handle.truncate(0)  # the same inode: a weight still mapped from it would fault when read
    assert_same_outputs(tiny, loaded)


def test_read_tensors_matches_safetensors(tiny: BaseModel, tmp_path: Path) -> None:
    """Every tensor as stored, in memory of its own, cast when asked."""
    from safetensors.torch import load_file

    path = write_ldm_checkpoint(tiny, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    theirs = load_file(path)
    ours = read_tensors(path, theirs)
    assert ours.keys() == theirs.keys()
    assert all(ours[key].dtype == torch.bfloat16 and torch.equal(ours[key], theirs[key]) for key in theirs)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in ours.values())
    cast = read_tensors(path, list(theirs)[:3], torch.float32)
    assert all(cast[key].dtype == torch.float32 and torch.equal(cast[key], theirs[key].float()) for key in cast)
