"""Offline SD 2.1-base loading (diffusers folder, single .safetensors/.ckpt) and model-file identification.

Every test runs with the network cut off (sockets and the Hub's download
functions raise and record), without HF_HUB_OFFLINE, and with tiny random
SD 2-shaped models written to tmp_path.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from ldm_export import (
    ldm_state_dict,
    vae_to_ldm,
    write_config_folder,
    write_diffusers_folder,
    write_ldm_checkpoint,
)

from fidesr_core.base_model import SD21_BASE_CONFIG_DIR, empty_components, load_base_model
from fidesr_core.checkpoint_inspect import identify_model_file, read_checkpoint_state_dict
from fidesr_core.errors import BaseModelError, ModelFileError
from fidesr_core.model import BaseModel
from fidesr_core.tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, tiny_base_model, tiny_fidesr_weights
from fidesr_core.weights import save_fidesr_weights

HUB_FUNCTIONS = ("hf_hub_download", "snapshot_download", "model_info", "hf_hub_url", "get_hf_file_metadata")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Cut sockets and every Hub download entry point; fail the test if anything tried them."""
    attempts: list[str] = []

    def refuse(name: str):
        def blocked(*args, **kwargs):
            attempts.append(name)
            raise AssertionError(f"network access attempted: {name}")

        return blocked

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("huggingface_hub", "diffusers", "transformers")):
            continue
        for function in HUB_FUNCTIONS:
            if callable(getattr(module, function, None)):
                monkeypatch.setattr(module, function, refuse(f"{module_name}.{function}"))
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def tiny() -> BaseModel:
    return tiny_base_model(seed=3)


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
    unet, vae, text_encoder = empty_components()
    counts = [round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for m in (unet, vae, text_encoder)]
    assert counts == [865.9, 83.7, 340.4]  # SPEC §1
    assert all(p.device.type == "meta" for m in (unet, vae, text_encoder) for p in m.parameters())
    assert unet.config.cross_attention_dim == 1024 and unet.config.sample_size == 64
    assert text_encoder.config.num_hidden_layers == 23 and text_encoder.config.hidden_size == 1024
    assert json.loads((SD21_BASE_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"  # fmt: skip


# --------------------------------------------------------------------------- successful loads


@pytest.mark.parametrize("with_index", [True, False])
def test_diffusers_folder_loads_identical_model(tiny: BaseModel, tmp_path: Path, with_index: bool) -> None:
    folder = write_diffusers_folder(tiny, tmp_path / "sd21")
    if not with_index:
        (folder / "model_index.json").unlink()
    loaded = load_base_model(folder)
    assert loaded.kind == "diffusers folder" and loaded.source == str(folder)
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
    save_file({k: v.half() for k, v in load_file(unet_file).items()}, folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")  # fmt: skip
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
    loaded = load_base_model(write_ldm_checkpoint(tiny, tmp_path / "a.safetensors", state=changed), config_dir=tiny_config_dir)  # fmt: skip
    assert_same_weights(tiny.text_encoder, loaded.text_encoder)


def test_768_file_name_loads_with_a_note(
    tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_ldm_checkpoint(tiny, tmp_path / "v2-1_768-ema-pruned.safetensors")
    identity = identify_model_file(path)
    assert identity.is_sd2 and identity.family == "sd2"
    assert any("768-v" in note for note in identity.notes)
    with caplog.at_level("WARNING", logger="fidesr_core.base_model"):
        load_base_model(path, config_dir=tiny_config_dir)
    assert "768-v" in caplog.text


def test_bundled_config_refuses_a_file_of_another_layout(tiny: BaseModel, tmp_path: Path) -> None:
    path = write_ldm_checkpoint(tiny, tmp_path / "small.safetensors")
    with pytest.raises(
        BaseModelError, match=r"small\.safetensors: the U-Net weights do not match its config: \d+ missing"
    ):
        load_base_model(path)  # bundled SD 2.1-base configs


def test_config_of_other_widths_is_refused_naming_the_shape(tiny: BaseModel, tmp_path: Path) -> None:
    config_dir = write_config_folder(tiny, tmp_path / "wider")
    unet_config = json.loads((config_dir / "unet" / "config.json").read_text())
    (config_dir / "unet" / "config.json").write_text(json.dumps({**unet_config, "block_out_channels": [24, 48]}))
    path = write_ldm_checkpoint(tiny, tmp_path / "narrow.ckpt")
    with pytest.raises(BaseModelError, match=r"narrow\.ckpt: U-Net weight \S+ has shape \(\d+.*the config expects"):
        load_base_model(path, config_dir=config_dir)


# --------------------------------------------------------------------------- reading files


def test_read_checkpoint_state_dict_unwraps_nesting(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"state_dict": tensors, "note": "x"}, "global_step": 5}, path)
    read = read_checkpoint_state_dict(path)
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], v) for k, v in tensors.items())
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="holds a list"):
        read_checkpoint_state_dict(tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(ModelFileError, match="holds no tensors"):
        read_checkpoint_state_dict(tmp_path / "meta.pt")


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
        read_checkpoint_state_dict(path)
    with pytest.raises(ModelFileError):
        identify_model_file(path)
    assert not marker.exists()


def test_identification_reads_only_the_safetensors_header(
    tiny: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors
    import safetensors.torch

    from fidesr_core.checkpoint_inspect import OpenedCheckpoint

    path = write_ldm_checkpoint(tiny, tmp_path / "model.safetensors")

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("tensor data read")

    for owner, name in ((safetensors, "safe_open"), (safetensors.torch, "load_file"), (torch, "load"),
                        (OpenedCheckpoint, "load"), (OpenedCheckpoint, "_read_safetensors")):  # fmt: skip
        monkeypatch.setattr(owner, name, no_tensor_reads)
    identity = identify_model_file(path)
    assert (identity.family, identity.container, identity.is_sd2) == ("sd2", "safetensors", True)


def test_loaded_weights_own_aligned_memory(tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path) -> None:
    """Weights never point into the file (mmap) nor at odd byte offsets (slower, numerically different kernels)."""
    for suffix in (".safetensors", ".ckpt"):
        loaded = load_base_model(write_ldm_checkpoint(tiny, tmp_path / f"m{suffix}"), config_dir=tiny_config_dir)
        for module in (loaded.unet, loaded.vae, loaded.text_encoder):
            for name, tensor in module.named_parameters():
                assert tensor.data_ptr() % 64 == 0, (suffix, name)


def test_read_checkpoint_state_dict_matches_safetensors(tiny: BaseModel, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = write_ldm_checkpoint(tiny, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    ours, theirs = read_checkpoint_state_dict(path), load_file(path)
    assert ours.keys() == theirs.keys()
    assert all(ours[key].dtype == torch.bfloat16 and torch.equal(ours[key], theirs[key]) for key in theirs)


# --------------------------------------------------------------------------- identification and refusals


def _fake_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.torch import save_file

    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return path


UNET = "model.diffusion_model."
SD1_SHAPES = {
    UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
    UNET + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (8, 768),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
}
SDXL_SHAPES = {
    UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
    UNET + "label_emb.0.0.weight": (1280, 16),
    UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (8, 768),
}
SD3_SHAPES = {UNET + "joint_blocks.0.x_block.attn.qkv.weight": (6, 2), UNET + "x_embedder.proj.weight": (2, 16, 2, 2)}
FLUX_SHAPES = {"double_blocks.0.img_attn.qkv.weight": (6, 2), "single_blocks.0.linear1.weight": (4, 2)}
LORA_SHAPES = {
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4),
    "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": (),
}


def _variant(tiny: BaseModel, in_channels: int) -> BaseModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": in_channels})
    return BaseModel(unet=unet, vae=tiny.vae, text_encoder=tiny.text_encoder, source="variant", kind="tiny random")


def _fidesr_pickle(tiny: BaseModel, path: Path) -> Path:
    save_fidesr_weights(tiny_fidesr_weights(tiny), path)  # the authors' fidesr.pkl layout
    return path


def _pisa_pickle(path: Path) -> Path:
    torch.save(
        {
            "unet_lora_encoder_modules_pix": ["conv_in"],
            "lora_rank_unet_pix": 4,
            "lora_rank_unet_sem": 4,
            "state_dict_unet": {"conv_in.lora_A.default_encoder_pix.weight": torch.zeros(4, 4, 3, 3)},
        },
        path,
    )
    return path


def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) * 2 // 3])
    return target


def _folder(tiny: BaseModel, root: Path, *, edit: str | None = None) -> Path:
    folder = write_diffusers_folder(tiny, root / "folder", prediction_type="v_prediction" if edit == "v" else "epsilon")
    if edit in ("96", "sd1"):
        config_path = folder / "unet" / "config.json"
        config = json.loads(config_path.read_text())
        config.update({"sample_size": 96} if edit == "96" else {"cross_attention_dim": 768, "use_linear_projection": False})  # fmt: skip
        config_path.write_text(json.dumps(config))
    return folder


def _make(case: str, tiny: BaseModel, tmp: Path) -> Path:
    """Write the bad input ``case`` under ``tmp`` and return its path."""
    if case == "sd1":
        return _fake_safetensors(tmp / "model.safetensors", SD1_SHAPES)
    if case == "sdxl":
        return _fake_safetensors(tmp / "sd_xl_base_1.0.safetensors", SDXL_SHAPES)
    if case == "sd3":
        return _fake_safetensors(tmp / "sd3_medium.safetensors", SD3_SHAPES)
    if case == "flux":
        return _fake_safetensors(tmp / "flux1-dev.safetensors", FLUX_SHAPES)
    if case == "lora":
        return _fake_safetensors(tmp / "detail_lora.safetensors", LORA_SHAPES)
    if case == "vae-only":
        vae = {key.removeprefix("first_stage_model."): value for key, value in vae_to_ldm(tiny.vae).items()}
        return write_ldm_checkpoint(tiny, tmp / "vae-ft-mse.safetensors", state=vae)
    if case == "no-vae":
        state = {key: value for key, value in ldm_state_dict(tiny).items() if not key.startswith("first_stage_model.")}
        return write_ldm_checkpoint(tiny, tmp / "unet_text.safetensors", state=state)
    if case == "fidesr-weights":
        return _fidesr_pickle(tiny, tmp / "fidesr.pkl")
    if case == "pisa-sr-weights":
        return _pisa_pickle(tmp / "pisa_sr.pkl")
    if case in ("sd2-inpainting", "sd2-depth"):
        return write_ldm_checkpoint(_variant(tiny, 9 if case == "sd2-inpainting" else 5), tmp / f"{case}.ckpt")
    if case == "random-safetensors":
        (tmp / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
        return tmp / "random.safetensors"
    if case == "random-ckpt":
        (tmp / "random.ckpt").write_bytes(bytes(range(256)) * 16)
        return tmp / "random.ckpt"
    if case == "truncated-safetensors":
        return _truncated(write_ldm_checkpoint(tiny, tmp / "full.safetensors"), tmp / "cut.safetensors")
    if case == "truncated-ckpt":
        return _truncated(write_ldm_checkpoint(tiny, tmp / "full.ckpt"), tmp / "cut.ckpt")
    if case == "empty-file":
        (tmp / "empty.ckpt").write_bytes(b"")
        return tmp / "empty.ckpt"
    if case == "text-file":
        (tmp / "notes.txt").write_text("not a model")
        return tmp / "notes.txt"
    if case == "missing":
        return tmp / "does-not-exist.safetensors"
    if case == "empty-folder":
        (tmp / "empty_dir").mkdir()
        return tmp / "empty_dir"
    if case == "partial-folder":
        tiny.unet.save_pretrained(tmp / "partial" / "unet")
        return tmp / "partial"
    if case in ("folder-v", "folder-96", "folder-sd1"):
        return _folder(tiny, tmp, edit=case.removeprefix("folder-"))
    raise AssertionError(case)


# case -> (family or None when identification raises, fragments the load error must contain)
BAD_INPUTS = {
    "sd1": ("sd1", ["looks like an SD 1.x checkpoint (text context 768", "conv proj_in"]),
    "sdxl": ("sdxl", ["SDXL", "conditioner.embedders"]),
    "sd3": ("sd3", ["Stable Diffusion 3"]),
    "flux": ("flux", ["Flux"]),
    "lora": ("lora", ["LoRA"]),
    "vae-only": ("vae-only", ["VAE-only"]),
    "no-vae": ("sd2", ["incomplete SD 2.x checkpoint", "first_stage_model"]),
    "fidesr-weights": ("fidesr-weights", ["FiDeSR weights", "--weights"]),
    "pisa-sr-weights": ("pisa-sr-weights", ["PiSA-SR weights"]),
    "sd2-inpainting": ("sd2-inpainting", ["inpainting", "9 input channels"]),
    "sd2-depth": ("sd2-depth", ["depth", "5 input channels"]),
    "random-safetensors": (None, ["not a valid safetensors file"]),
    "random-ckpt": (None, ["not a readable PyTorch file"]),
    "truncated-safetensors": (None, ["is truncated"]),
    "truncated-ckpt": (None, ["truncated"]),
    "empty-file": (None, ["empty (0 bytes)"]),
    "text-file": (None, ["not a model file this loader reads"]),
    "missing": (None, ["no such file or folder"]),
    "empty-folder": ("unknown", ["an empty folder"]),
    "partial-folder": ("unknown", ["incomplete diffusers folder", "vae/", "text_encoder/"]),
    "folder-v": ("sd2-768-v", ["768-v", "prediction_type v_prediction"]),
    "folder-96": ("sd2-768-v", ["768-v", "sample_size 96"]),
    "folder-sd1": ("sd1", ["SD 1.x diffusers folder", "text context 768"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_a_clear_message(
    case: str, tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path
) -> None:
    family, fragments = BAD_INPUTS[case]
    path = _make(case, tiny, tmp_path)
    with pytest.raises(BaseModelError) as caught:
        load_base_model(path, config_dir=tiny_config_dir)
    message = str(caught.value)
    assert str(path) in message
    assert "Stable Diffusion 2.1-base" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if family is None:
        with pytest.raises(ModelFileError):
            identify_model_file(path)
    else:
        identity = identify_model_file(path)
        assert identity.family == family and not identity.is_sd2


@pytest.mark.parametrize(
    ("case", "container"),
    [
        ("sd1", "safetensors"),
        ("fidesr-weights", "ckpt (pickle)"),
        ("sd2-inpainting", "ckpt (pickle)"),
        ("folder-v", "diffusers folder"),
    ],  # fmt: skip
)
def test_identity_names_the_container(case: str, container: str, tiny: BaseModel, tmp_path: Path) -> None:
    assert identify_model_file(_make(case, tiny, tmp_path)).container == container


def test_usable_inputs_identify_as_sd2(tiny: BaseModel, tmp_path: Path) -> None:
    folder = write_diffusers_folder(tiny, tmp_path / "folder")
    ckpt = write_ldm_checkpoint(tiny, tmp_path / "v2-1_512-ema-pruned.ckpt")
    for path, container in ((folder, "diffusers folder"), (ckpt, "ckpt (pickle)")):
        identity = identify_model_file(path)
        assert (identity.family, identity.container, identity.is_sd2) == ("sd2", container, True)
        assert not any("768" in note for note in identity.notes)
