"""Model-file identification and the refusal of every input that is not a usable SD 2.1-base model.

SD 1.x, SDXL, SD 3, Flux, LoRAs, VAE-only files, FiDeSR/PiSA-SR weights, SD 2
inpainting/depth/768-v variants, damaged files and incomplete folders must each
be identified (or refused by identification) and refused by the loader with a
message naming the file and the problem. Every test runs with the network cut
off and with tiny random SD 2-shaped models written to tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from ldm_export import ldm_state_dict, vae_to_ldm, write_config_folder, write_diffusers_folder, write_ldm_checkpoint

from fidesr_core.errors import BaseModelError, ModelFileError
from fidesr_core.loading.base_model import load_base_model
from fidesr_core.loading.identify import identify_model_file
from fidesr_core.loading.weights import save_restorer_weights
from fidesr_core.networks.model import BaseModel
from fidesr_core.networks.tiny import TINY_UNET_CONFIG, tiny_fidesr_weights

# Every test runs with the network cut off.
pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def tiny_config_dir(tiny: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_folder(tiny, tmp_path_factory.mktemp("tiny_config"))


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
# SD 3 and Flux by the keys (and sizes) real files have, which diffusers' infer_diffusers_model_type reads
SD3_SHAPES = {UNET + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), UNET + "pos_embed": (1, 36864, 8)}
FLUX_SHAPES = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.linear1.weight": (4, 2)}
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
    save_restorer_weights(tiny_fidesr_weights(tiny), path)  # the authors' fidesr.pkl layout
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
        config.update(
            {"sample_size": 96} if edit == "96" else {"cross_attention_dim": 768, "use_linear_projection": False}
        )
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
    "sd3": ("other-model", ["Stable Diffusion 3"]),
    "flux": ("other-model", ["Flux"]),
    "lora": ("lora", ["LoRA"]),
    "vae-only": ("model-part", ["VAE-only"]),
    "no-vae": ("sd2", ["incomplete SD 2.x checkpoint", "first_stage_model"]),
    "fidesr-weights": ("fidesr-weights", ["FiDeSR weights", "--weights"]),
    "pisa-sr-weights": ("pisa-sr-weights", ["PiSA-SR weights"]),
    "sd2-inpainting": ("sd2-variant", ["SD 2.x inpainting", "9 input channels"]),
    "sd2-depth": ("sd2-variant", ["SD 2.x depth", "5 input channels"]),
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
    ],
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


def test_a_missing_base_points_to_fidesr_download_and_the_mirrors(tmp_path: Path) -> None:
    """stabilityai/stable-diffusion-2-1-base left the Hub in November 2025: the message names what works now."""
    from fidesr_core.app.download import SD21_BASE
    from fidesr_core.loading.base_model import SD21_BASE_MIRRORS

    assert SD21_BASE_MIRRORS == SD21_BASE.sources  # the hint names what `fidesr download` tries

    with pytest.raises(BaseModelError) as caught:
        load_base_model(tmp_path / "v2-1_512-ema-pruned.safetensors")
    message = str(caught.value)
    assert "no such file or folder" in message and "`fidesr download`" in message and "stabilityai" not in message
    assert SD21_BASE.sources and all(source in message for source in SD21_BASE.sources)
