"""The one table for "what is this file" (``loading/identify.py``): training outputs told by their layouts,
diffusers' ``infer_diffusers_model_type`` where it knows the file, the original U-Net's text context and
input channels, then key names.

The base-model loader and the weights reader both ask it, so the same file is named the same way by
both; identities are typed (``ModelFamily``, ``Container``) and frozen. Files are built here on the fly,
the training outputs in the layouts the released trainers write (docs/algorithm.md §6).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import safetensors.torch
import torch
from weights_fixtures import authors_checkpoint

from fidesr_core.errors import BaseModelError, WeightsFileError
from fidesr_core.loading.base_model import load_base_model
from fidesr_core.loading.files import Container, Header
from fidesr_core.loading.identify import ModelFamily, ModelIdentity, identify_header, identify_model_file
from fidesr_core.loading.weights import load_restorer_weights

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def authors() -> dict:
    return authors_checkpoint()


def _header(
    shapes: dict[str, tuple[int, ...]], top_keys: set[str] | None = None, name: str = "in-memory.ckpt"
) -> Header:
    return Header(Path(name), Container.PICKLE, shapes, top_keys=frozenset(top_keys or ()))


def _renamed_adapters(state: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    renames = {f".default_{part}.": f".default_{part}{suffix}." for part in ("encoder", "decoder", "others")}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def _training_output(case: str, authors: dict, path: Path) -> Path:
    """Files of the released trainers: PiSA-SR's and OSEDiff's ``save_model`` layouts, and FiDeSR's."""
    lists = {key: authors[key] for key in authors if key.endswith("_modules")}
    lora = authors["state_dict_unet"]
    if case == "pisa-sr":
        payload = {f"{key}_{kind}": value for kind in ("pix", "sem") for key, value in lists.items()}
        payload |= {"lora_rank_unet_pix": 4, "lora_rank_unet_sem": 4}
        payload["state_dict_unet"] = {**_renamed_adapters(lora, "_pix"), **_renamed_adapters(lora, "_sem")}
    elif case == "pisa-sr-lists-only":  # no rank key, only the pixel decoder adapter: the lists say PiSA-SR
        payload = {"unet_lora_decoder_modules_pix": lists["unet_lora_decoder_modules"]}
        payload["state_dict_unet"] = {k: v for k, v in _renamed_adapters(lora, "_pix").items() if "decoder" in k}
    elif case == "pisa-sr-safetensors":  # only the tensor names say it
        tensors = {k: v.contiguous() for k, v in _renamed_adapters(lora, "_pix").items()}
        safetensors.torch.save_file(tensors, str(path))
        return path
    elif case == "osediff":
        payload = {**lists, "rank_unet": 4, "rank_vae": 4, "vae_lora_encoder_modules": ["encoder.conv_in"]}
        payload |= {
            "state_dict_unet": lora,
            "state_dict_vae": {"encoder.conv_in.lora_A.default_encoder.weight": torch.zeros(4, 3, 3, 3)},
        }
    elif case == "osediff-unet-only":  # a U-Net-only OSEDiff file: rank_unet is the tell
        payload = {**lists, "rank_unet": 4, "state_dict_unet": lora}
    elif case == "fidesr-lora-only":
        payload = {key: authors[key] for key in authors if key != "lrrb_state_dict"}
    else:
        raise AssertionError(case)
    torch.save(payload, path)
    return path


# case -> (family, what the weights reader says: None when it reads the file, else a fragment of its refusal)
TRAINING_OUTPUTS = {
    "pisa-sr": (ModelFamily.PISA_SR_WEIGHTS, "PiSA-SR", None),
    "pisa-sr-lists-only": (ModelFamily.PISA_SR_WEIGHTS, "PiSA-SR", "the semantic LoRA set is missing"),
    "pisa-sr-safetensors": (ModelFamily.PISA_SR_WEIGHTS, "PiSA-SR", "without our format marker"),
    "osediff": (ModelFamily.OSEDIFF_WEIGHTS, "OSEDiff", "has no tensor lora_B"),
    "osediff-unet-only": (ModelFamily.OSEDIFF_WEIGHTS, "OSEDiff", "the VAE encoder LoRA is missing"),
    "fidesr-lora-only": (ModelFamily.FIDESR_WEIGHTS, "FiDeSR", "the LRRB is missing"),
}


@pytest.mark.parametrize("case", sorted(TRAINING_OUTPUTS))
def test_both_loaders_name_a_training_output_alike(case: str, authors: dict, tmp_path: Path) -> None:
    family, name, refusal = TRAINING_OUTPUTS[case]
    suffix = ".safetensors" if case.endswith("safetensors") else ".pkl"
    path = _training_output(case, authors, tmp_path / f"{case}{suffix}")
    identity = identify_model_file(path)
    assert identity.family is family and not identity.is_sd2 and f"{name} weights" in identity.description
    with pytest.raises(BaseModelError) as as_base:
        load_base_model(path)
    assert f"{name} weights" in str(as_base.value) and "--weights" in str(as_base.value)
    assert str(path) in str(as_base.value)
    if refusal is None:
        assert load_restorer_weights(path).family == family.value.removesuffix("-weights")
        return
    with pytest.raises(WeightsFileError) as as_weights:
        load_restorer_weights(path)
    message = str(as_weights.value)
    assert str(path) in message and name in message and refusal in message


def test_identities_are_typed_and_frozen(authors: dict, tmp_path: Path) -> None:
    identity = identify_model_file(_training_output("osediff", authors, tmp_path / "o.pkl"))
    assert isinstance(identity, ModelIdentity)
    assert isinstance(identity.family, ModelFamily) and isinstance(identity.container, Container)
    assert identity.container is Container.PICKLE and str(identity.container) == "ckpt (pickle)"
    assert str(identity.family) == f"{identity.family}" == "osediff-weights"
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.is_sd2 = True  # type: ignore[misc]


def test_the_base_model_families_are_the_diffusion_models() -> None:
    base = {family for family in ModelFamily if family.is_base_model}
    assert {ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SD2_768_V, ModelFamily.SDXL, ModelFamily.MODEL_PART} <= base
    assert not base & {ModelFamily.LORA, ModelFamily.CONTROLNET, ModelFamily.UNKNOWN, ModelFamily.EMBEDDING}
    assert not base & {ModelFamily.FIDESR_WEIGHTS, ModelFamily.PISA_SR_WEIGHTS, ModelFamily.OSEDIFF_WEIGHTS}


U = "model.diffusion_model."


@pytest.mark.parametrize(
    ("shapes", "family", "fragment"),
    [  # the key diffusers' infer_diffusers_model_type looks for in each kind of real file
        ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}, "sdxl", "an SDXL"),
        ({U + "input_blocks.10.0.skip_connection.bias": (640,), U + "input_blocks.0.0.weight": (128, 7, 3, 3)},
         "sd2-variant", "x4-upscaler"),
        ({"control_model.time_embed.0.weight": (1280, 320)}, "controlnet", "ControlNet"),
        ({U + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), U + "pos_embed": (1, 36864, 1536)},
         "other-model", "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "other-model", "Flux"),
        ({"txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias": (6144,)}, "other-model",
         "hunyuan-video (as diffusers names it)"),
    ],
)  # fmt: skip
def test_what_diffusers_recognises_is_named_so(shapes: dict, family: str, fragment: str) -> None:
    identity = identify_header(_header(shapes))
    assert identity.family == family and not identity.is_sd2 and fragment in identity.description


def test_the_unet_checks_say_what_gave_it_away() -> None:
    """Where diffusers answers SD 1.x or 2.x (or nothing), the U-Net's text context and input channels decide."""
    unet = {U + "input_blocks.0.0.weight": (32, 4, 3, 3), U + "input_blocks.1.1.proj_in.weight": (32, 32)}
    sd2 = {**unet, U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 1024)}
    complete = {"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}
    complete["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"] = (1024,)
    identity = identify_header(_header(sd2 | complete))
    assert identity.family == "sd2" and identity.is_sd2 and identity.notes == ()
    sd1 = {**sd2, U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 768)}
    assert identify_header(_header(sd1)).description == "an SD 1.x checkpoint (text context 768)"
    inpainting = {**sd2, U + "input_blocks.0.0.weight": (32, 9, 3, 3)}
    assert "an SD 2.x inpainting checkpoint (9 input channels" in identify_header(_header(inpainting)).description
    unclip = {**sd2, U + "label_emb.0.0.weight": (128, 1024)}
    assert "unCLIP" in identify_header(_header(unclip)).description
    incomplete = identify_header(_header(sd2))
    assert not incomplete.is_sd2 and "incomplete SD 2.x checkpoint (no VAE" in incomplete.description
    named_768 = identify_header(_header(sd2 | complete, name="v2-1_768-ema-pruned.ckpt"))
    assert named_768.is_sd2 and any("768-v" in note for note in named_768.notes)


def test_an_unrecognised_file_names_some_of_its_keys() -> None:
    identity = identify_header(_header({"alpha": (1,), "beta": (2,), "gamma": (3,), "delta": (4,)}))
    assert identity.family is ModelFamily.UNKNOWN
    assert identity.description == "no Stable Diffusion checkpoint we recognise (keys such as alpha, beta, delta)"
    assert identify_header(_header({})).description == "a file without tensors"
