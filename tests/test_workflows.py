"""The shipped workflows (``workflows/*.json``, UI format): checked statically, and the family ones run.

Node definitions: the pack's nodes as ComfyUI's ``/object_info`` describes
them (built from the classes), ComfyUI's core nodes from a fixture recorded
from a real ComfyUI.  The PiSA-SR, OSEDiff and side-by-side workflows are also
run here, converted to the API format and executed node by node on the ComfyUI
stand-ins with tiny models of each family (ComfyUI's own nodes by small
stand-ins); running them in a real ComfyUI is described in the README.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from family_fixtures import osediff_checkpoint, pisa_sr_checkpoint
from ldm_export import write_diffusers_folder
from workflow_validation import (
    VIRTUAL_NODE_TYPES,
    api_prompt,
    load_core_definitions,
    node_info,
    validate_workflow,
    widget_slots,
)

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
CORE_FIXTURE = Path(__file__).parent / "fixtures" / "comfy_core_nodes.json"

# Model-file combos list whatever is on the machine: check the form of the value instead.
FILE_RULES = {
    ("FiDeSRModelLoader", "base_model"): lambda value: (
        isinstance(value, str) and value.startswith(("diffusers/", "checkpoints/"))
    ),
    ("FiDeSRModelLoader", "fidesr_weights"): lambda value: (
        isinstance(value, str) and value.endswith((".pkl", ".safetensors"))
    ),
    ("CheckpointLoaderSimple", "ckpt_name"): lambda value: isinstance(value, str) and value.endswith(".safetensors"),
    ("LoadImage", "image"): lambda value: isinstance(value, str) and bool(value),
}


@pytest.fixture(scope="module")
def definitions(comfy) -> dict[str, dict[str, Any]]:
    ours = {node_id: node_info(node_id, node_class) for node_id, node_class in comfy.nodes.items()}
    core = load_core_definitions(CORE_FIXTURE)
    assert not set(ours) & set(core)
    # What /object_info returns is JSON: compare in that form.
    return json.loads(json.dumps({**core, **ours}))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _types(workflow: dict[str, Any]) -> list[str]:
    return [node["type"] for node in workflow["nodes"]]


def _by_type(workflow: dict[str, Any], node_type: str) -> list[dict[str, Any]]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def _source(workflow: dict[str, Any], node: dict[str, Any], input_name: str) -> dict[str, Any] | None:
    """The node feeding ``input_name`` of ``node``."""
    socket = next((s for s in node["inputs"] if s["name"] == input_name), None)
    if socket is None or socket.get("link") is None:
        return None
    link = next(link for link in workflow["links"] if link[0] == socket["link"])
    return next(n for n in workflow["nodes"] if n["id"] == link[1])


def _widget(definitions: dict[str, Any], node: dict[str, Any], name: str) -> Any:
    slots = widget_slots(definitions[node["type"]])
    index = next(i for i, (slot_name, role, _) in enumerate(slots) if slot_name == name and role == "value")
    return node["widgets_values"][index]


def test_the_required_workflows_are_shipped() -> None:
    names = {path.name for path in WORKFLOWS}
    assert {"FiDeSR_upscale_one_node.json", "FiDeSR_composable_chain.json", "FiDeSR_with_comfy_nodes.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_is_valid_against_the_node_definitions(path: Path, definitions: dict[str, Any]) -> None:
    workflow = _load(path)
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []
    # Only our nodes, ComfyUI core nodes recorded in the fixture and frontend-only notes.
    assert set(_types(workflow)) <= set(definitions) | VIRTUAL_NODE_TYPES


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_says_which_files_go_in_which_model_folder(path: Path) -> None:
    notes = [
        " ".join(node["widgets_values"]) for node in _load(path)["nodes"] if node["type"] in ("Note", "MarkdownNote")
    ]
    text = "\n".join(notes)
    for needed in ("models/fidesr", "fidesr.pkl", "models/checkpoints", "v2-1_512-ema-pruned.safetensors"):
        assert needed in text
    assert "models/diffusers" in text and "stable-diffusion-2-1-base" in text


# Values a shipped workflow sets on purpose to something other than the default: (file, node id, input).
CHOSEN_VALUES = {
    ("FiDeSR_with_comfy_nodes.json", 13, "method"): "wavelet",
    # PiSA-SR and OSEDiff as their scripts run them: no frequency injection.
    ("PiSA-SR_upscale.json", 3, "lf_strength"): 0,
    ("PiSA-SR_upscale.json", 3, "hf_strength"): 0,
    ("OSEDiff_upscale_with_prompt.json", 5, "lf_strength"): 0,
    ("OSEDiff_upscale_with_prompt.json", 5, "hf_strength"): 0,
    ("FiDeSR_PiSA-SR_OSEDiff_side_by_side.json", 6, "lf_strength"): 0,
    ("FiDeSR_PiSA-SR_OSEDiff_side_by_side.json", 6, "hf_strength"): 0,
}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_seeds_are_fixed_and_values_are_the_defaults(path: Path, definitions: dict[str, Any]) -> None:
    workflow = _load(path)
    for node in workflow["nodes"]:
        if node["type"] not in definitions or not node["type"].startswith("FiDeSR"):
            continue
        slots = widget_slots(definitions[node["type"]])
        for (name, role, spec), value in zip(slots, node.get("widgets_values", []), strict=True):
            if role == "seed_control":
                assert value == "fixed", f"{path.name}: {node['type']}.{name} should not re-roll the seed"
            elif role == "value" and "default" in spec[1]:
                expected = CHOSEN_VALUES.get((path.name, node["id"], name), spec[1]["default"])
                assert value == expected, f"{path.name}: {node['type']}.{name}"


def test_one_node_workflow(definitions: dict[str, Any]) -> None:
    workflow = _load(PACK_ROOT / "workflows" / "FiDeSR_upscale_one_node.json")
    assert sorted(set(_types(workflow)) - VIRTUAL_NODE_TYPES) == sorted(
        ["LoadImage", "FiDeSRModelLoader", "FiDeSRUpscale", "SaveImage"]
    )
    (upscale,) = _by_type(workflow, "FiDeSRUpscale")
    assert _source(workflow, upscale, "model")["type"] == "FiDeSRModelLoader"
    assert _source(workflow, upscale, "image")["type"] == "LoadImage"
    (save,) = _by_type(workflow, "SaveImage")
    assert _source(workflow, save, "images") is upscale


def test_composable_chain_workflow(definitions: dict[str, Any]) -> None:
    workflow = _load(PACK_ROOT / "workflows" / "FiDeSR_composable_chain.json")
    (save,) = _by_type(workflow, "SaveImage")
    chain = []
    node = _source(workflow, save, "images")
    while node is not None:
        chain.append(node["type"])
        node = _source(workflow, node, "latent") or _source(workflow, node, "image")
    assert chain == [
        "FiDeSRDecode",
        "FiDeSRHighFrequencyInject",
        "FiDeSRLowFrequencyInject",
        "FiDeSRRefine",
        "FiDeSRResidual",
        "FiDeSREncode",
        "LoadImage",
    ]
    # The comparison: a preview of the result before the frequency injections.
    (preview,) = _by_type(workflow, "PreviewImage")
    decode = _source(workflow, preview, "images")
    assert decode["type"] == "FiDeSRDecode" and _source(workflow, decode, "latent")["type"] == "FiDeSRRefine"
    assert _widget(definitions, decode, "color_fix") == "adain"


def test_workflow_mixing_comfy_nodes(definitions: dict[str, Any]) -> None:
    workflow = _load(PACK_ROOT / "workflows" / "FiDeSR_with_comfy_nodes.json")
    (residual,) = _by_type(workflow, "FiDeSRResidual")
    text_encode = _source(workflow, residual, "positive")
    assert text_encode["type"] == "CLIPTextEncode"
    assert _source(workflow, text_encode, "clip")["type"] == "CheckpointLoaderSimple"
    (vae_decode,) = _by_type(workflow, "VAEDecode")
    assert _source(workflow, vae_decode, "samples")["type"].startswith("FiDeSR")
    assert _source(workflow, vae_decode, "vae")["type"] == "CheckpointLoaderSimple"
    (checkpoint,) = _by_type(workflow, "CheckpointLoaderSimple")
    (loader,) = _by_type(workflow, "FiDeSRModelLoader")
    # Both loaders read the same SD 2.1-base file.
    base_model = _widget(definitions, loader, "base_model")
    assert base_model == "checkpoints/" + _widget(definitions, checkpoint, "ckpt_name")


# ----------------------------------------------------------------------------- the validator can fail


def _node(workflow: dict[str, Any], node_type: str) -> dict[str, Any]:
    return _by_type(workflow, node_type)[0]


def _broken_copies(workflow: dict[str, Any], definitions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    broken: dict[str, dict[str, Any]] = {}

    def variant(name: str) -> dict[str, Any]:
        broken[name] = copy.deepcopy(workflow)
        return broken[name]

    lf_index = [name for name, role, _ in widget_slots(definitions["FiDeSRLowFrequencyInject"])].index("strength")
    _node(variant("strength above max"), "FiDeSRLowFrequencyInject")["widgets_values"][lf_index] = 5.0
    order_index = [name for name, role, _ in widget_slots(definitions["FiDeSRLowFrequencyInject"])].index("order")
    _node(variant("float for an INT"), "FiDeSRLowFrequencyInject")["widgets_values"][order_index] = 2.5
    _node(variant("unknown combo value"), "FiDeSRLowFrequencyInject")["widgets_values"][-1] = "gaussian"
    _node(variant("missing widget value"), "FiDeSRDecode")["widgets_values"].pop()
    _node(variant("custom node pack"), "FiDeSRRefine")["type"] = "SomeOtherPackNode"
    wrong_type = variant("link type mismatch")
    for link in wrong_type["links"]:
        if link[5] == "LATENT":
            link[5] = "IMAGE"
            break
    unlinked = variant("required input unconnected")
    refine = _node(unlinked, "FiDeSRRefine")
    refine["inputs"][0]["link"] = None
    renamed = variant("renamed input")
    _node(renamed, "FiDeSRResidual")["inputs"][1]["name"] = "samples"
    base_index = 0
    _node(variant("bad base_model form"), "FiDeSRModelLoader")["widgets_values"][base_index] = "v2-1.safetensors"
    return broken


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_with_extra_node_properties_stays_valid(path: Path, definitions: dict[str, Any]) -> None:
    """The frontend's model list (``properties.models``) and other properties are not part of a node's inputs."""
    workflow = _load(path)
    for node in workflow["nodes"]:
        node.setdefault("properties", {})["models"] = [
            {
                "name": "fidesr.safetensors",
                "url": "https://huggingface.co/x/y/resolve/main/f.safetensors",
                "directory": "fidesr",
            }
        ]
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []


def test_validator_finds_broken_workflows(definitions: dict[str, Any]) -> None:
    workflow = _load(PACK_ROOT / "workflows" / "FiDeSR_composable_chain.json")
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []
    for name, broken in _broken_copies(workflow, definitions).items():
        assert validate_workflow(broken, definitions, file_rules=FILE_RULES), f"not detected: {name}"


def test_core_fixture_was_recorded_from_comfyui() -> None:
    fixture = json.loads(CORE_FIXTURE.read_text())
    assert fixture["comfyui_version"].startswith("0.")
    for node_id, info in fixture["nodes"].items():
        assert info["name"] == node_id and "input" in info and "output" in info


# ----------------------------------------------------------------------------- the family workflows

PISA_SR = "PiSA-SR_upscale.json"
OSEDIFF = "OSEDiff_upscale_with_prompt.json"
SIDE_BY_SIDE = "FiDeSR_PiSA-SR_OSEDiff_side_by_side.json"
WEIGHTS_OF = {"FiDeSR": "fidesr.pkl", "PiSA-SR": "pisa_sr.pkl", "OSEDiff": "osediff.pkl"}


def _loader_of(workflow: dict[str, Any], upscale: dict[str, Any]) -> dict[str, Any]:
    loader = _source(workflow, upscale, "model")
    assert loader["type"] == "FiDeSRModelLoader"
    return loader


def test_the_family_workflows_are_shipped_and_wired(definitions: dict[str, Any]) -> None:
    pisa = _load(PACK_ROOT / "workflows" / PISA_SR)
    (upscale,) = _by_type(pisa, "FiDeSRUpscale")
    assert _widget(definitions, _loader_of(pisa, upscale), "fidesr_weights") == "pisa_sr.pkl"
    # PiSA-SR's two strengths are widgets on the node (1 and 1: its default mode); no injection as released.
    assert [_widget(definitions, upscale, name) for name in ("pixel_strength", "semantic_strength")] == [1, 1]
    assert [_widget(definitions, upscale, name) for name in ("lf_strength", "hf_strength")] == [0, 0]

    osediff = _load(PACK_ROOT / "workflows" / OSEDIFF)
    (upscale,) = _by_type(osediff, "FiDeSRUpscale")
    loader = _loader_of(osediff, upscale)
    assert _widget(definitions, loader, "fidesr_weights") == "osediff.pkl"
    text_encode = _source(osediff, upscale, "positive")
    assert text_encode["type"] == "CLIPTextEncode" and _widget(definitions, text_encode, "text").startswith(", ")
    checkpoint = _source(osediff, text_encode, "clip")
    assert checkpoint["type"] == "CheckpointLoaderSimple"
    assert _widget(definitions, loader, "base_model") == "checkpoints/" + _widget(definitions, checkpoint, "ckpt_name")

    side = _load(PACK_ROOT / "workflows" / SIDE_BY_SIDE)
    (image,) = _by_type(side, "LoadImage")
    assert len(_by_type(side, "FiDeSRModelLoader")) == 3
    saves = _by_type(side, "SaveImage")
    families, prefixes = [], []
    for save in saves:
        upscale = _source(side, save, "images")
        assert upscale["type"] == "FiDeSRUpscale" and _source(side, upscale, "image") is image
        weights = _widget(definitions, _loader_of(side, upscale), "fidesr_weights")
        family = next(name for name, file in WEIGHTS_OF.items() if file == weights)
        families.append(family)
        prefixes.append(_widget(definitions, save, "filename_prefix"))
        injected = _widget(definitions, upscale, "lf_strength") > 0 and _widget(definitions, upscale, "hf_strength") > 0
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
    weights.save_fidesr_weights(tiny.tiny_fidesr_weights(base, seed=12), folder / "fidesr.pkl")
    torch.save(pisa_sr_checkpoint(base, seed=13), folder / "pisa_sr.pkl")
    torch.save(osediff_checkpoint(base, seed=14), folder / "osediff.pkl")
    return SimpleNamespace(
        base="diffusers/tiny-workflows",
        base_path=comfy.models_dir / "diffusers" / "tiny-workflows",
        folder=folder,
        cross_attention_dim=base.unet.config.cross_attention_dim,
    )


class _ClipStandIn:
    """Load Checkpoint's CLIP, standing in: a fixed embedding per text, of the U-Net's width."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.texts: list[str] = []

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
    clip = _ClipStandIn(models.cross_attention_dim)

    def save_image(images: torch.Tensor, filename_prefix: str) -> tuple:
        assert filename_prefix not in saved, f"two SaveImage nodes write {filename_prefix}"
        saved[filename_prefix] = images
        return ()

    core = {
        "LoadImage": lambda image_name: (image, torch.zeros(1, *image.shape[1:3])),
        "SaveImage": save_image,
        "CheckpointLoaderSimple": lambda ckpt_name: (None, clip, None),
        "CLIPTextEncode": lambda clip, text: (clip.encode(text),),
    }
    outputs: dict[int, tuple] = {}
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
    return SimpleNamespace(saved=saved, shown=shown, clip=clip)


def _engine_upscale(comfy, models, weights: str, image: torch.Tensor, *, injection: bool, prompt=None):
    """The same image through ``fidesr_core.upscale`` with the model assembled from the files."""
    pipeline = comfy.module("fidesr_core.pipeline")
    injection_module = comfy.module("fidesr_core.steps.injection")
    restorer = comfy.module("fidesr_core.loading.restorer")
    model = restorer.load_restorer(models.base_path, models.folder / weights, precision="fp32", device="cpu")
    strength = 0.1 if injection else 0.0
    settings = pipeline.UpscaleSettings(
        low=injection_module.LowFrequencySettings(strength=strength),
        high=injection_module.HighFrequencySettings(strength=strength),
    )
    with torch.inference_mode():
        return pipeline.upscale(model, image.permute(0, 3, 1, 2), settings, prompt_embedding=prompt).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return torch.rand((1, 32, 32, 3), generator=torch.Generator().manual_seed(5))  # IMAGE [1, H, W, 3]


def test_the_pisa_sr_workflow_runs_pisa_sr(comfy, definitions, family_models, photo) -> None:
    workflow = _load(PACK_ROOT / "workflows" / PISA_SR)
    assert validate_workflow(workflow, definitions, file_rules=FILE_RULES) == []
    run = _run_workflow(comfy, workflow, definitions, photo, family_models)
    (text,) = run.shown.values()
    assert text.startswith(f"PiSA-SR: pisa_sr.pkl on {family_models.base}")
    (image,) = run.saved.values()
    assert image.shape == (1, 128, 128, 3)
    assert torch.equal(image, _engine_upscale(comfy, family_models, "pisa_sr.pkl", photo, injection=False))


def test_the_osediff_workflow_runs_osediff_with_its_prompt(comfy, definitions, family_models, photo) -> None:
    workflow = _load(PACK_ROOT / "workflows" / OSEDIFF)
    run = _run_workflow(comfy, workflow, definitions, photo, family_models)
    (text,) = run.shown.values()
    assert text.startswith(f"OSEDiff: osediff.pkl on {family_models.base}")
    (prompt_text,) = run.clip.texts
    (image,) = run.saved.values()
    prompt = run.clip.encode(prompt_text)[0][0]
    expected = _engine_upscale(comfy, family_models, "osediff.pkl", photo, injection=False, prompt=prompt)
    assert torch.equal(image, expected)
    without = _engine_upscale(comfy, family_models, "osediff.pkl", photo, injection=False)
    assert not torch.equal(image, without)  # the prompt reached the U-Net


def test_the_side_by_side_workflow_runs_each_family_on_the_same_photo(comfy, definitions, family_models, photo) -> None:
    workflow = _load(PACK_ROOT / "workflows" / SIDE_BY_SIDE)
    run = _run_workflow(comfy, workflow, definitions, photo, family_models)
    assert sorted(text.split(":")[0] for text in run.shown.values()) == sorted(WEIGHTS_OF)
    assert sorted(run.saved) == sorted(f"side_by_side/{family}" for family in WEIGHTS_OF)
    injected = {"FiDeSR": True, "PiSA-SR": False, "OSEDiff": True}
    for family, weights in WEIGHTS_OF.items():
        expected = _engine_upscale(comfy, family_models, weights, photo, injection=injected[family])
        assert torch.equal(run.saved[f"side_by_side/{family}"], expected), family
