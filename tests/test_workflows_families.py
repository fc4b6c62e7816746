"""The PiSA-SR, OSEDiff and side-by-side workflows: wired as documented, and run.

Each is converted to the API format and executed node by node on the ComfyUI stand-ins with
tiny models of each family (ComfyUI's own nodes by small stand-ins); every saved image must
equal the engine's ``upscale`` on that family's model.  Running them in a real ComfyUI is
described in the README.
"""

from __future__ import annotations

import hashlib
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from checkpoint_stand_ins import clip_and_vae, comfy_lora_and_config, stand_in_model
from family_fixtures import osediff_checkpoint, pisa_sr_checkpoint
from ldm_export import write_diffusers_folder
from workflow_graph import (
    FILE_RULES,
    WORKFLOWS_DIR,
    interfaces,
    load_workflow,
    nodes_of_type,
    source_node,
    widget_value,
)
from workflow_validation import api_prompt, validate_workflow


@pytest.fixture(scope="module")
def definitions() -> dict[str, dict[str, Any]]:
    return interfaces()


PISA_SR = "PiSA-SR_upscale.json"
OSEDIFF = "OSEDiff_upscale_with_prompt.json"
SIDE_BY_SIDE = "FiDeSR_PiSA-SR_OSEDiff_side_by_side.json"
WEIGHTS_OF = {"FiDeSR": "fidesr.pkl", "PiSA-SR": "pisa_sr.pkl", "OSEDiff": "osediff.pkl"}


def _loader_of(workflow: dict[str, Any], upscale: dict[str, Any], kind: str = "FiDeSRModelLoader") -> dict[str, Any]:
    loader = source_node(workflow, upscale, "model")
    assert loader["type"] == kind
    return loader


def test_the_family_workflows_are_shipped_and_wired(definitions: dict[str, Any]) -> None:
    pisa = load_workflow(WORKFLOWS_DIR / PISA_SR)
    (upscale,) = nodes_of_type(pisa, "FiDeSRUpscale")
    assert widget_value(definitions, _loader_of(pisa, upscale), "fidesr_weights") == "pisa_sr.pkl"
    # PiSA-SR's two strengths are widgets on the node (1 and 1: its default mode); no injection as released.
    assert [widget_value(definitions, upscale, name) for name in ("pixel_strength", "semantic_strength")] == [1, 1]
    assert [widget_value(definitions, upscale, name) for name in ("lf_strength", "hf_strength")] == [0, 0]

    osediff = load_workflow(WORKFLOWS_DIR / OSEDIFF)
    (upscale,) = nodes_of_type(osediff, "FiDeSRUpscale")
    loader = _loader_of(osediff, upscale, "FiDeSRModelFromCheckpoint")
    assert widget_value(definitions, loader, "fidesr_weights") == "osediff.pkl"
    text_encode = source_node(osediff, upscale, "positive")
    assert text_encode["type"] == "CLIPTextEncode" and widget_value(definitions, text_encode, "text").startswith(", ")
    checkpoint = source_node(osediff, text_encode, "clip")
    assert checkpoint["type"] == "CheckpointLoaderSimple"
    # the one checkpoint gives the U-Net, the VAE and the CLIP: the base is read once
    assert all(source_node(osediff, loader, name) is checkpoint for name in ("sd_model", "clip", "vae"))

    side = load_workflow(WORKFLOWS_DIR / SIDE_BY_SIDE)
    (image,) = nodes_of_type(side, "LoadImage")
    assert len(nodes_of_type(side, "FiDeSRModelLoader")) == 3
    saves = nodes_of_type(side, "SaveImage")
    families, prefixes = [], []
    for save in saves:
        upscale = source_node(side, save, "images")
        assert upscale["type"] == "FiDeSRUpscale" and source_node(side, upscale, "image") is image
        weights = widget_value(definitions, _loader_of(side, upscale), "fidesr_weights")
        family = next(name for name, file in WEIGHTS_OF.items() if file == weights)
        families.append(family)
        prefixes.append(widget_value(definitions, save, "filename_prefix"))
        injected = (
            widget_value(definitions, upscale, "lf_strength") > 0
            and widget_value(definitions, upscale, "hf_strength") > 0
        )
        if family != "FiDeSR" and injected:
            families.append("injected " + family)
    assert sorted(f for f in families if not f.startswith("injected")) == sorted(WEIGHTS_OF)
    assert any(f.startswith("injected") for f in families)  # LF/HF on at least one non-FiDeSR path
    assert len(set(prefixes)) == 3


@pytest.fixture(scope="module")
def family_models(comfy) -> SimpleNamespace:
    """A tiny diffusers base and the three families' weights in the released .pkl layouts, named as the workflows."""
    tiny = comfy.module("fidesr_core.networks.tiny")
    weights = comfy.module("fidesr_core.loading.weights")
    base = tiny.tiny_base_model(seed=11)
    write_diffusers_folder(base, comfy.models_dir / "diffusers" / "tiny-workflows")
    folder = comfy.models_dir / "fidesr"
    folder.mkdir(exist_ok=True)
    weights.save_restorer_weights(tiny.tiny_fidesr_weights(base, seed=12), folder / "fidesr.pkl")
    torch.save(pisa_sr_checkpoint(base, seed=13), folder / "pisa_sr.pkl")
    torch.save(osediff_checkpoint(base, seed=14), folder / "osediff.pkl")
    return SimpleNamespace(
        base="diffusers/tiny-workflows",
        base_path=comfy.models_dir / "diffusers" / "tiny-workflows",
        folder=folder,
        cross_attention_dim=base.unet.config.cross_attention_dim,
        tiny=base,
        config_dir=comfy.models_dir / "tiny-config",
    )


class _ClipStandIn:
    """Load Checkpoint's CLIP, standing in: a fixed embedding per text, of the U-Net's width (CLIP Text Encode);
    the tiny text encoder's for FiDeSR Model from Checkpoint's released prompt."""

    def __init__(self, width: int, released: Any = None) -> None:
        self.width, self.released = width, released
        self.texts: list[str] = []

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens(self, text: str) -> torch.Tensor:
        return self.released(text)

    def encode(self, text: str) -> list:
        self.texts.append(text)
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        embedding = torch.randn(1, 77, self.width, generator=torch.Generator().manual_seed(seed))
        return [[embedding, {"pooled_output": None}]]


def _run_workflow(comfy, workflow: dict[str, Any], definitions, image: torch.Tensor, models) -> SimpleNamespace:
    """Execute ``workflow`` as ComfyUI would (validate_inputs, then execute, in link order), recording outputs."""
    prompt = api_prompt(workflow, definitions)
    saved: dict[str, torch.Tensor] = {}
    shown: dict[int, str] = {}
    embedding, tokenizer = (
        comfy.module("fidesr_core.networks.text_embedding"),
        comfy.module("fidesr_core.loading.clip_tokenizer"),
    )
    released = lambda text: embedding.encode_token_ids(models.tiny.text_encoder, tokenizer.prompt_ids(text))  # noqa: E731
    clip = _ClipStandIn(models.cross_attention_dim, released)
    _, vae = clip_and_vae(models.tiny, released)

    def save_image(images: torch.Tensor, filename_prefix: str) -> tuple:
        assert filename_prefix not in saved, f"two SaveImage nodes write {filename_prefix}"
        saved[filename_prefix] = images
        return ()

    core = {
        "LoadImage": lambda image_name: (image, torch.zeros(1, *image.shape[1:3])),
        "SaveImage": save_image,
        "CheckpointLoaderSimple": lambda ckpt_name: (stand_in_model(models.tiny), clip, vae),
        "CLIPTextEncode": lambda clip, text: (clip.encode(text),),
    }
    outputs: dict[int, tuple] = {}
    with comfy_lora_and_config(comfy.module("fidesr_core.loading.restorer"), models.tiny, models.config_dir):
        _run_in_order(comfy, prompt, outputs, core, shown, models)
    return SimpleNamespace(saved=saved, shown=shown, clip=clip)


def _run_in_order(comfy, prompt: dict, outputs: dict, core: dict, shown: dict, models) -> None:
    while len(outputs) < len(prompt):
        ready = [
            node_id
            for node_id, entry in prompt.items()
            if node_id not in outputs
            and all(value[0] in outputs for value in entry["inputs"].values() if isinstance(value, list))
        ]
        assert ready, "the workflow has a cycle or a link to a node that does not run"
        for node_id in ready:
            entry = prompt[node_id]
            inputs = {
                name: outputs[value[0]][value[1]] if isinstance(value, list) else value
                for name, value in entry["inputs"].items()
            }
            if entry["class_type"] == "FiDeSRModelLoader":
                inputs["base_model"] = models.base  # the stand-in for the SD 2.1-base file of the workflow
            if entry["class_type"] == "LoadImage":
                outputs[node_id] = core["LoadImage"](inputs["image"])
                continue
            if entry["class_type"] in core:
                outputs[node_id] = core[entry["class_type"]](**inputs)
                continue
            node = comfy.nodes[entry["class_type"]]
            if "validate_inputs" in vars(node):  # a node's own check, with the inputs it names (as ComfyUI calls it)
                wanted = [
                    p.name
                    for p in inspect.signature(node.validate_inputs).parameters.values()
                    if p.kind != p.VAR_KEYWORD
                ]
                assert node.validate_inputs(**{name: inputs[name] for name in wanted}) is True
            with torch.inference_mode():
                result = node.execute(**inputs)
            outputs[node_id] = result.result
            if result.ui is not None:
                (shown[node_id],) = result.ui.as_dict()["text"]


def _engine_upscale(comfy, models, weights: str, image: torch.Tensor, *, injection: bool, prompt=None):
    """The same image through ``fidesr_core.upscale`` with the model assembled from the files."""
    pipeline = comfy.module("fidesr_core.pipeline")
    settings_module = comfy.module("fidesr_core.settings")
    restorer = comfy.module("fidesr_core.loading.restorer")
    model = restorer.load_restorer(models.base_path, models.folder / weights, precision="fp32", device="cpu")
    strength = 0.1 if injection else 0.0
    settings = settings_module.UpscaleSettings(
        lf=settings_module.LowFrequencySettings(strength=strength),
        hf=settings_module.HighFrequencySettings(strength=strength),
    )
    with torch.inference_mode():
        return pipeline.upscale(model, image.permute(0, 3, 1, 2), settings, prompt_embedding=prompt).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return torch.rand((1, 32, 32, 3), generator=torch.Generator().manual_seed(5))  # IMAGE [1, H, W, 3]


def test_the_pisa_sr_workflow_runs_pisa_sr(comfy, definitions, family_models, photo) -> None:
    workflow = load_workflow(WORKFLOWS_DIR / PISA_SR)
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []
    run = _run_workflow(comfy, workflow, definitions, photo, family_models)
    (text,) = run.shown.values()
    assert text.startswith(f"PiSA-SR: pisa_sr.pkl on {family_models.base}")
    (image,) = run.saved.values()
    assert image.shape == (1, 128, 128, 3)
    assert torch.equal(image, _engine_upscale(comfy, family_models, "pisa_sr.pkl", photo, injection=False))


def test_the_osediff_workflow_runs_osediff_with_its_prompt(comfy, definitions, family_models, photo) -> None:
    workflow = load_workflow(WORKFLOWS_DIR / OSEDIFF)
    run = _run_workflow(comfy, workflow, definitions, photo, family_models)
    (text,) = run.shown.values()
    assert text.startswith("OSEDiff: osediff.pkl on the checkpoint's MODEL")
    (prompt_text,) = run.clip.texts
    (image,) = run.saved.values()
    prompt = run.clip.encode(prompt_text)[0][0]
    expected = _engine_upscale(comfy, family_models, "osediff.pkl", photo, injection=False, prompt=prompt)
    assert (image - expected).abs().max() * 255 < 1e-3  # ComfyUI's LoRA sums differ from peft's in the last bits
    without = _engine_upscale(comfy, family_models, "osediff.pkl", photo, injection=False)
    assert not torch.equal(image, without)  # the prompt reached the U-Net


def test_the_side_by_side_workflow_runs_each_family_on_the_same_photo(comfy, definitions, family_models, photo) -> None:
    workflow = load_workflow(WORKFLOWS_DIR / SIDE_BY_SIDE)
    run = _run_workflow(comfy, workflow, definitions, photo, family_models)
    assert sorted(text.split(":")[0] for text in run.shown.values()) == sorted(WEIGHTS_OF)
    assert sorted(run.saved) == sorted(f"side_by_side/{family}" for family in WEIGHTS_OF)
    injected = {"FiDeSR": True, "PiSA-SR": False, "OSEDiff": True}
    for family, weights in WEIGHTS_OF.items():
        expected = _engine_upscale(comfy, family_models, weights, photo, injection=injected[family])
        assert torch.equal(run.saved[f"side_by_side/{family}"], expected), family
