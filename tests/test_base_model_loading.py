"""What loading a base model guarantees beyond reading the weights right: diffusers folders in the layouts
``from_pretrained`` handles (shards), no code run from a folder's ``.bin``, a text encoder that covers SD 2's
vocabulary, safetensors told by their layout whatever the header length, and ``doctor`` loading a base
before calling it usable.

Every test runs with the network cut off and with tiny random SD 2-shaped models written to tmp_path.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from ldm_export import write_config_folder, write_diffusers_folder, write_ldm_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel
from weights_fixtures import with_header_length_low_byte

from fidesr_core.app.doctor import run_doctor
from fidesr_core.errors import BaseModelError
from fidesr_core.loading.base_model import check_base_model, load_base_model
from fidesr_core.loading.identify import identify_model_file
from fidesr_core.networks.model import BaseModel
from fidesr_core.networks.tiny import TINY_TEXT_CONFIG

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def tiny_config_dir(tiny: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_folder(tiny, tmp_path_factory.mktemp("tiny_config"))


def _same_weights(expected: torch.nn.Module, got: torch.nn.Module) -> bool:
    left, right = expected.state_dict(), got.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


# --------------------------------------------------------------------------- folders


def test_sharded_diffusers_folder_loads_identical_model(tiny: BaseModel, tmp_path: Path) -> None:
    folder = write_diffusers_folder(tiny, tmp_path / "sharded")
    for component in ("unet", "vae", "text_encoder"):
        for file in (folder / component).glob("*.safetensors"):
            file.unlink()
        getattr(tiny, component).save_pretrained(folder / component, max_shard_size="200KB")
    assert len(list((folder / "unet").glob("*.safetensors"))) > 1
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_base_model(folder)
    for component in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(tiny, component), getattr(loaded, component)), component


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_folders_bin_file_is_refused_without_running(tiny: BaseModel, tmp_path: Path) -> None:
    folder = write_diffusers_folder(tiny, tmp_path / "evil")
    marker = tmp_path / "pwned"
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(
        {"text_model.embeddings.token_embedding.weight": _Evil(marker)}, folder / "text_encoder" / "pytorch_model.bin"
    )
    with pytest.raises(
        BaseModelError, match=r"text_encoder: the text encoder cannot be loaded: a .bin file there was refused"
    ):
        load_base_model(folder)
    assert not marker.exists()


def test_a_missing_weight_in_a_folder_is_refused(tiny: BaseModel, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = write_diffusers_folder(tiny, tmp_path / "short")
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["decoder.conv_out.weight"]
    save_file(state, file)
    with pytest.raises(
        BaseModelError, match=r"vae: the VAE (cannot be loaded|weights do not match).*decoder\.conv_out"
    ):
        load_base_model(folder)


# --------------------------------------------------------------------------- the text encoder's vocabulary


def _small_vocabulary(tiny: BaseModel) -> BaseModel:
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT_CONFIG, "vocab_size": 1000})).eval()
    return BaseModel(unet=tiny.unet, vae=tiny.vae, text_encoder=text_encoder, source="small", kind="tiny random")


@pytest.mark.parametrize("form", ["diffusers folder", "single file"])
def test_text_encoder_with_too_few_token_embeddings_is_refused_when_loaded(
    tiny: BaseModel, tmp_path: Path, form: str
) -> None:
    """SD 2's tokenizer hands out ids up to 49407; fewer embeddings would fail with an IndexError when upscaling."""
    small = _small_vocabulary(tiny)
    if form == "diffusers folder":
        path, config_dir = write_diffusers_folder(small, tmp_path / "folder"), None
    else:
        path = write_ldm_checkpoint(small, tmp_path / "small.safetensors")
        config_dir = write_config_folder(small, tmp_path / "config")
    with pytest.raises(BaseModelError) as caught:
        load_base_model(path, config_dir=config_dir)
    message = str(caught.value)
    assert str(path) in message and "1000 token embeddings" in message and "49408" in message


# --------------------------------------------------------------------------- telling safetensors by content


def test_safetensors_base_is_told_by_its_layout_whatever_the_header_length(
    tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path
) -> None:
    """A file named without a known suffix is read by content: a header length ending in 0x80 (the pickle
    marker) still makes it safetensors."""
    written = write_ldm_checkpoint(tiny, tmp_path / "written.safetensors")
    for low_byte in range(256):
        path = with_header_length_low_byte(written, tmp_path / f"base-{low_byte}.model", low_byte)
        identity = identify_model_file(path)
        assert (identity.container, identity.is_sd2) == ("safetensors", True), low_byte
        if low_byte in (0x00, 0x80):
            assert _same_weights(tiny.unet, load_base_model(path, config_dir=tiny_config_dir).unet)
        path.unlink()


# --------------------------------------------------------------------------- doctor


@pytest.mark.usefixtures("one_thread")
def test_doctor_loads_the_base_before_calling_it_usable(tiny: BaseModel, tmp_path: Path) -> None:
    """A tiny SD 2-shaped file identifies as SD 2.x but does not fit the bundled SD 2.1-base configs."""
    path = write_ldm_checkpoint(tiny, tmp_path / "tiny-sd2.safetensors")
    assert identify_model_file(path).is_sd2
    with pytest.raises(BaseModelError, match="text encoder cannot be loaded"):
        check_base_model(path)
    out = io.StringIO()
    assert run_doctor(base=path, out=out) is False
    report = out.getvalue()
    assert "NOT usable" in report and "cannot be loaded (" in report and "usable as the FiDeSR base" not in report

    folder = write_diffusers_folder(tiny, tmp_path / "folder")  # loads with its own configs
    assert check_base_model(folder).is_sd2  # doctor's report of a usable base: tests/test_cli.py
