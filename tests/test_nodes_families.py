"""The nodes with PiSA-SR and OSEDiff weights: the loader tells the family from the file, every node runs on
tiny random checkpoints of each format, and the chain, FiDeSR Upscale and ``fidesr_core.upscale`` agree.

Checkpoints in the authors' layouts (``family_fixtures``) and our safetensors form of each are written
into the stub's ``models/fidesr``; fixtures in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from family_fixtures import osediff_checkpoint, pisa_sr_checkpoint
from ldm_export import write_diffusers_folder
from node_helpers import chain, error_of, run_node

BASE = "diffusers/tiny-families"


@pytest.fixture(scope="module")
def files(comfy) -> SimpleNamespace:
    tiny = comfy.module("fidesr_core.networks.tiny")
    weights_module = comfy.module("fidesr_core.loading.weights")
    base = tiny.tiny_base_model(seed=6)
    write_diffusers_folder(base, comfy.models_dir / "diffusers" / "tiny-families")
    folder = comfy.models_dir / "fidesr"
    folder.mkdir(exist_ok=True)
    pisa, osediff = pisa_sr_checkpoint(base, seed=7), osediff_checkpoint(base, seed=8)
    torch.save(pisa, folder / "pisa_sr.pkl")
    torch.save(osediff, folder / "osediff.pkl")
    for name in ("pisa_sr", "osediff"):
        weights = weights_module.load_restorer_weights(folder / f"{name}.pkl")
        weights_module.save_restorer_weights(weights, folder / f"{name}.safetensors")
    weights_module.save_restorer_weights(tiny.tiny_fidesr_weights(base, seed=9), folder / "fidesr.pkl")
    no_semantic = {key: value for key, value in pisa.items() if not key.endswith("_sem")}
    no_semantic["state_dict_unet"] = {k: v for k, v in pisa["state_dict_unet"].items() if "_pix." in k}
    torch.save(no_semantic, folder / "pisa_sr_no_semantic.pkl")
    return SimpleNamespace(base=comfy.models_dir / "diffusers" / "tiny-families", folder=folder)


@pytest.fixture(scope="module")
def handles(comfy, files) -> dict[str, Any]:
    """One loaded model per family, through Load FiDeSR Model (fp32)."""
    names = {"fidesr": "fidesr.pkl", "pisa-sr": "pisa_sr.pkl", "osediff": "osediff.pkl"}
    loaded = {}
    for family, name in names.items():
        (loaded[family],) = run_node(comfy, "FiDeSRModelLoader", base_model=BASE, fidesr_weights=name, precision="fp32")
    return loaded


def _engine_model(comfy, files, weights: str):
    """The same model assembled by the engine directly from the files."""
    restorer = comfy.module("fidesr_core.loading.restorer")
    return restorer.load_restorer(files.base, files.folder / weights, precision="fp32", device="cpu")


@pytest.mark.parametrize(
    ("weights", "family", "name"),
    [
        ("fidesr.pkl", "fidesr", "FiDeSR"),
        ("pisa_sr.pkl", "pisa-sr", "PiSA-SR"),
        ("pisa_sr.safetensors", "pisa-sr", "PiSA-SR"),
        ("osediff.pkl", "osediff", "OSEDiff"),
        ("osediff.safetensors", "osediff", "OSEDiff"),
    ],
)
def test_loader_tells_the_family_from_the_file_and_shows_it(comfy, files, weights, family, name) -> None:
    with torch.inference_mode():
        output = comfy.nodes["FiDeSRModelLoader"].execute(base_model=BASE, fidesr_weights=weights, precision="fp32")
    (handle,) = output.result
    assert handle.model.family == family and handle.family_name == name and str(handle).startswith(f"{name}(")
    (shown,) = output.ui.as_dict()["text"]
    assert shown.startswith(f"{name}: {weights} on {BASE}, fp32")
    # One memory-managed network each; only FiDeSR has an LRRB.
    expected = {"unet", "vae", "lrrb"} if family == "fidesr" else {"unet", "vae"}
    assert set(handle.patchers) == expected
    assert {name: patcher.model.network for name, patcher in handle.patchers.items()}["unet"] is handle.model.unet


def test_the_loader_says_it_loads_all_three(comfy) -> None:
    info = comfy.nodes["FiDeSRModelLoader"].GET_NODE_INFO_V1()
    for text in ("FiDeSR", "PiSA-SR", "OSEDiff", "pisa_sr.pkl", "osediff.pkl", "download from"):
        assert text in info["description"]
    refine = comfy.nodes["FiDeSRRefine"].GET_NODE_INFO_V1()
    assert "passes through unchanged" in refine["description"]
    assert "passes through unchanged" in refine["input"]["required"]["latent"][1]["tooltip"]
    residual = comfy.nodes["FiDeSRResidual"].GET_NODE_INFO_V1()["input"]["optional"]
    for strength in ("pixel_strength", "semantic_strength"):
        assert "FiDeSR and OSEDiff" in residual[strength][1]["tooltip"]
    assert "OSEDiff" in residual["positive"][1]["tooltip"]


def _conditioning(handle, seed: int) -> list:
    embedding = torch.randn(1, 77, handle.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    return [[embedding, {"pooled_output": None}]]


CASES = {
    "fidesr": ("fidesr.pkl", {}),
    "pisa-sr default": ("pisa_sr.pkl", {}),
    "pisa-sr adjustable": ("pisa_sr.pkl", {"pixel_strength": 0.5, "semantic_strength": 1.4}),
    "osediff": ("osediff.pkl", {}),
    "osediff with a prompt": ("osediff.pkl", {"positive": 11}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chain_equals_the_upscale_node_and_the_engine_for_every_family(comfy, files, handles, lq_image, case) -> None:
    weights, extra = CASES[case]
    family = case.split()[0]
    handle = handles[family]
    residual = {"tile_size": 96, "tile_overlap": 32, **extra}
    prompt = None
    if "positive" in extra:
        residual["positive"] = _conditioning(handle, extra["positive"])
        prompt = residual["positive"][0][0]
    chained = chain(comfy, handle, lq_image, residual=residual)
    if family != "fidesr":  # LRRB Refine leaves a latent of a model without an LRRB as it came
        assert torch.equal(chained["refined"]["samples"], chained["residual"]["samples"])
        assert chained["refined"]["fidesr"].stages == ("encode", "residual")
    (one_node,) = run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_image, **{**extra, **residual})
    assert torch.equal(one_node, chained["image"])
    pipeline = comfy.module("fidesr_core.pipeline")
    settings = comfy.module("fidesr_core.settings").UpscaleSettings(
        pixel_strength=extra.get("pixel_strength"), semantic_strength=extra.get("semantic_strength")
    )
    with torch.inference_mode():
        engine = pipeline.upscale(
            _engine_model(comfy, files, weights), lq_image.permute(0, 3, 1, 2), settings, prompt_embedding=prompt
        )
    assert torch.equal(one_node, engine.permute(0, 2, 3, 1))


def test_strengths_steer_pisa_sr_only(comfy, handles, lq_image) -> None:
    def upscaled(family: str, **strengths: float) -> torch.Tensor:
        (image,) = run_node(comfy, "FiDeSRUpscale", model=handles[family], image=lq_image, **strengths)
        return image

    pisa_default = upscaled("pisa-sr")
    assert not torch.equal(upscaled("pisa-sr", pixel_strength=0.5, semantic_strength=1.4), pisa_default)
    assert not torch.equal(upscaled("pisa-sr", semantic_strength=0.0), pisa_default)
    # 1 and 1 is the default mode itself; the families with one LoRA set ignore the strengths.
    assert torch.equal(upscaled("pisa-sr", pixel_strength=1.0, semantic_strength=1.0), pisa_default)
    for family in ("fidesr", "osediff"):
        assert torch.equal(upscaled(family, pixel_strength=0.3, semantic_strength=2.0), upscaled(family))


def test_a_latent_goes_through_models_of_its_own_family_only(comfy, handles, lq_image) -> None:
    (pisa_latent,) = run_node(comfy, "FiDeSREncode", model=handles["pisa-sr"], image=lq_image)
    message = error_of(comfy, "FiDeSRResidual", model=handles["fidesr"], latent=pisa_latent)
    assert message.startswith("FiDeSR One-Step U-Net: the latent was encoded by the PiSA-SR model but FiDeSR One-Step")
    assert "got the FiDeSR model; connect the same model" in message
    (osediff_latent,) = run_node(comfy, "FiDeSREncode", model=handles["osediff"], image=lq_image)
    (osediff_residual,) = run_node(comfy, "FiDeSRResidual", model=handles["osediff"], latent=osediff_latent)
    message = error_of(comfy, "FiDeSRRefine", model=handles["fidesr"], latent=osediff_residual)
    assert message.startswith("FiDeSR LRRB Refine: the latent was encoded by the OSEDiff model")


def test_a_pisa_sr_file_with_a_set_missing_is_refused_naming_the_file(comfy, files) -> None:
    message = error_of(
        comfy, "FiDeSRModelLoader", base_model=BASE, fidesr_weights="pisa_sr_no_semantic.pkl", precision="fp32"
    )
    assert message.startswith("Load FiDeSR Model: ")
    assert str(Path(files.folder) / "pisa_sr_no_semantic.pkl") in message and "semantic LoRA set" in message
    assert "Where the files come from: fidesr.pkl" in message and "pisa_sr.pkl" in message
