"""FiDeSR Model from Checkpoint wired to stand-ins of ComfyUI's MODEL, CLIP, VAE and LoRA loader (tiny models,
``checkpoint_stand_ins``).  The node must give Load FiDeSR Model's numbers for all three
families (PiSA-SR's adjustable mode too) and leave the user's MODEL unpatched.  The real ComfyUI
(full-size SD 2.1) is checked by ``test_nodes_real_comfyui.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from checkpoint_stand_ins import SD20, StandInBase, StandInModel, clip_and_vae, comfy_lora_and_config, stand_in_model
from node_helpers import error_of, run_node

FAMILIES = ("fidesr", "pisa-sr", "osediff")


@pytest.fixture(scope="module")
def made(comfy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per family: the handle Load FiDeSR Model's way and the one FiDeSR Model from Checkpoint made on stand-ins."""
    tiny, restorer = comfy.module("fidesr_core.networks.tiny"), comfy.module("fidesr_core.loading.restorer")
    weights_io, model_handle = comfy.module("fidesr_core.loading.weights"), comfy.module("nodes.model_handle")
    embedding, tokenizer = (
        comfy.module("fidesr_core.networks.text_embedding"),
        comfy.module("fidesr_core.loading.clip_tokenizer"),
    )
    base = tiny.tiny_base_model(seed=3)
    clip, vae = clip_and_vae(
        base, lambda text: embedding.encode_token_ids(base.text_encoder, tokenizer.prompt_ids(text))
    )
    fidesr_dir = comfy.stub.models_dir / "fidesr"
    fidesr_dir.mkdir(parents=True, exist_ok=True)
    made = {"user_model": stand_in_model(base), "user_vae": vae}
    made["user_vae_before"] = {key: value.clone() for key, value in vae.first_stage_model.state_dict().items()}
    makers = {
        "fidesr": tiny.tiny_fidesr_weights,
        "pisa-sr": tiny.tiny_pisa_sr_weights,
        "osediff": tiny.tiny_osediff_weights,
    }
    with comfy_lora_and_config(restorer, base, tmp_path_factory.mktemp("tiny_config")):
        for index, (family, make) in enumerate(makers.items()):
            weights = make(base, seed=20 + index)
            weights_io.save_restorer_weights(weights, fidesr_dir / f"{family}.safetensors")
            (checkpoint,) = run_node(
                comfy, "FiDeSRModelFromCheckpoint", sd_model=made["user_model"], clip=clip, vae=vae,
                fidesr_weights=f"{family}.safetensors",
            )  # fmt: skip
            loaded = restorer.assemble_restorer(copy.deepcopy(base), weights, precision="fp32", device="cpu")
            made[family] = (model_handle.FiDeSRModelHandle.wrap(loaded, base_name="b", weights_name="w"), checkpoint)
    return made


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_images_as_load_fidesr_model(comfy, made: dict, family: str, lq_images: torch.Tensor) -> None:
    loaded, checkpoint = made[family]
    assert checkpoint.family_name == loaded.family_name
    for settings in ({}, {"tile_size": 16, "tile_overlap": 8}):
        images = [run_node(comfy, "FiDeSRUpscale", model=h, image=lq_images[:1], **settings)[0] for h in made[family]]
        assert (images[0] - images[1]).abs().max() * 255 < 1e-3, settings
    assert checkpoint.patchers["unet"].model.calls[-1][1] == torch.float32  # ComfyUI's dtype reached the MODEL


def test_pisa_sr_adjustable_mode_runs_the_pixel_only_clone(comfy, made: dict, lq_images: torch.Tensor) -> None:
    loaded, checkpoint = made["pisa-sr"]
    restoration = comfy.module("fidesr_core.ops.restoration")
    z_lq = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    unet = checkpoint.model.unet
    comfy.stub.reset_records()
    with torch.inference_mode():
        for pixel, semantic in ((1.0, 1.0), (1.0, 0.5), (0.7, 0.0), (0.5, 0.5)):
            mine, theirs = (
                restoration.predict_residual(h.model, z_lq, pixel_strength=pixel, semantic_strength=semantic)
                for h in (checkpoint, loaded)
            )
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    loads = [request[0][0] for request in comfy.stub.load_requests]
    assert loads == [unet.patchers["pixel"], unet.patchers["full"]] * 2  # (1, 0.5) and (0.7, 0): pixel pass, back
    pixel_patches = {kinds[0] for kinds in unet.patchers["pixel"].patches.values()}
    assert pixel_patches == {"lora"} and len(unet.patchers["full"].patches) == len(unet.patchers["pixel"].patches)


def test_patches_go_on_clones_and_osediff_conv_in_is_set_before_its_lora(made: dict) -> None:
    assert made["user_model"].patches == {}
    full = made["osediff"][1].patchers["unet"]
    assert full.patches["diffusion_model.conv_in.weight"] == ["set", "lora"]
    assert made["fidesr"][1].patchers["unet"] is not made["user_model"]


def test_the_users_vae_keeps_its_weights_when_osediffs_vae_lora_is_merged(made: dict) -> None:
    after = made["user_vae"].first_stage_model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in made["user_vae_before"].items())
    checkpoint_vae = made["osediff"][1].model.vae.state_dict()
    assert not torch.equal(
        checkpoint_vae["encoder.conv_in.weight"], made["pisa-sr"][1].model.vae.state_dict()["encoder.conv_in.weight"]
    )


def test_wrong_inputs_name_the_node(comfy, made: dict) -> None:
    user_model = made["user_model"]
    sdxl = StandInModel(StandInBase(user_model.model.unet, config=type("SDXL", (SD20,), {})))
    v_prediction = StandInModel(StandInBase(user_model.model.unet, prediction="V_PREDICTION"))
    inputs = {"clip": None, "vae": None, "fidesr_weights": "fidesr.safetensors"}
    node = "FiDeSRModelFromCheckpoint"
    assert error_of(comfy, node, sd_model="a string", **inputs).startswith(
        "FiDeSR Model from Checkpoint: sd_model must be a MODEL"
    )
    assert "got a SDXL model predicting EPS" in error_of(comfy, node, sd_model=sdxl, **inputs)
    assert "got a SD20 model predicting V_PREDICTION" in error_of(comfy, node, sd_model=v_prediction, **inputs)
    assert "vae must be a VAE" in error_of(comfy, node, sd_model=user_model, **inputs)
