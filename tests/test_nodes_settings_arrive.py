"""Every node input reaches the code that uses it.

For each value input of each node (the sockets carry models, images and latents), a spy sits on
the function of the pack that uses the value; the node runs once with its defaults and once with
the one input changed, and the spy must receive the changed value.  An input missing from the
table fails the coverage test.  Fixtures (the ComfyUI stand-in, a tiny model, a chain run) are in
``conftest.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from checkpoint_stand_ins import clip_and_vae, comfy_lora_and_config, stand_in_model
from node_helpers import PACK_ROOT, run_node

Extract = Callable[[tuple, dict], Any]
SOCKETS = {"model", "image", "latent", "reference", "sd_model", "clip", "vae"}


def _arg(index: int, name: str) -> Extract:
    return lambda args, kwargs: kwargs[name] if name in kwargs else args[index]


# (module of the pack, function, what it received)
PREPARE = ("fidesr_core.pipeline", "prepare_lq", lambda a, k: k["upscale_by"])
LATENT_MODE = ("fidesr_core.pipeline", "encode_image", lambda a, k: k["latent_mode"])
SEED = ("fidesr_core.ops.vae_codec", "latent_noise", _arg(1, "seed"))
ENCODE_TILE = ("fidesr_core.tiled_vae.codec", "encode_moments", lambda a, k: k["tile_size"])
DECODE_TILE = ("fidesr_core.tiled_vae.codec", "decode_latents", lambda a, k: k["tile_size"])
UNET_TILE = ("fidesr_core.ops.restoration", "run_tiled", lambda a, k: k["tile_size"])
UNET_OVERLAP = ("fidesr_core.ops.restoration", "run_tiled", lambda a, k: k["overlap"])
PROMPT = ("fidesr_core.pipeline", "predict_residual", lambda a, k: k["prompt_embedding"] is not None)
PIXEL = ("fidesr_core.ops.restoration", "unet_passes", _arg(1, "pixel"))
SEMANTIC = ("fidesr_core.ops.restoration", "unet_passes", _arg(2, "semantic"))
COLOR_FIX = ("fidesr_core.ops.preprocess", "apply_color_fix", _arg(2, "method"))


def _branch(function: str, field: str) -> tuple[str, str, Extract]:
    return ("fidesr_core.pipeline", function, lambda a, k: getattr(a[3], field))


def _kernel(function: str, name: str) -> tuple[str, str, Extract]:
    return ("fidesr_core.ops.injection", function, lambda a, k: k[name])


LF, HF = "low_frequency_delta", "high_frequency_delta"
# node -> input -> (changed value, spy)
INPUTS: dict[str, dict[str, tuple[Any, tuple[str, str, Extract]]]] = {
    "FiDeSREncode": {
        "upscale_by": (2.0, PREPARE),
        "latent_mode": ("mode", LATENT_MODE),
        "seed": (5, SEED),
        "tile_size": (256, ENCODE_TILE),
    },
    "FiDeSRResidual": {
        "tile_size": (48, UNET_TILE),
        "tile_overlap": (8, UNET_OVERLAP),
        "positive": ("a prompt", PROMPT),
        "pixel_strength": (0.5, PIXEL),
        "semantic_strength": (1.5, SEMANTIC),
    },
    "FiDeSRRefine": {},
    "FiDeSRLowFrequencyInject": {
        "strength": (0.3, _branch(LF, "strength")),
        "gamma": (1.5, _branch(LF, "gamma")),
        "cutoff": (0.2, _kernel("butterworth_lowpass", "cutoff")),
        "order": (3, _kernel("butterworth_lowpass", "order")),
        "filter": ("radial", _kernel("butterworth_lowpass", "geometry")),
        "channel_tau": (0.5, _kernel("channel_gate", "tau")),
        "channel_sharpness": (4.0, _kernel("channel_gate", "sharpness")),
    },
    "FiDeSRHighFrequencyInject": {
        "strength": (0.3, _branch(HF, "strength")),
        "gamma": (1.5, _branch(HF, "gamma")),
        "cutoff": (0.2, _kernel("butterworth_highpass", "cutoff")),
        "order": (3, _kernel("butterworth_highpass", "order")),
        "filter": ("radial", _kernel("butterworth_highpass", "geometry")),
        "channel_cutoff": (0.2, _kernel("channel_gate", "cutoff")),
        "channel_tau": (0.5, _kernel("channel_gate", "tau")),
        "channel_sharpness": (4.0, _kernel("channel_gate", "sharpness")),
    },
    "FiDeSRDecode": {"color_fix": ("wavelet", COLOR_FIX), "tile_size": (16, DECODE_TILE)},
    "FiDeSRUpscale": {
        "upscale_by": (2.0, PREPARE),
        "lf_strength": (0.3, _branch(LF, "strength")),
        "hf_strength": (0.3, _branch(HF, "strength")),
        "color_fix": ("wavelet", COLOR_FIX),
        "latent_mode": ("mode", LATENT_MODE),
        "seed": (5, SEED),
        "tile_size": (48, UNET_TILE),
        "tile_overlap": (8, UNET_OVERLAP),
        "positive": ("a prompt", PROMPT),
        "pixel_strength": (0.5, PIXEL),
        "semantic_strength": (1.5, SEMANTIC),
    },
    "FiDeSRColorFix": {"method": ("wavelet", ("nodes.color_fix_node", "apply_color_fix", _arg(2, "method")))},
    "FiDeSRModelLoader": {
        "base_model": ("diffusers/tiny-b", ("fidesr_core.loading.base_model", "load_base_model", _arg(0, "path"))),
        "fidesr_weights": ("b.pkl", ("fidesr_core.loading.weights", "load_restorer_weights", _arg(0, "path"))),
        "precision": ("bf16", ("fidesr_core.loading.restorer", "assemble_restorer", lambda a, k: k["precision"])),
    },
    "FiDeSRModelFromCheckpoint": {
        "fidesr_weights": ("b.pkl", ("fidesr_core.loading.weights", "load_restorer_weights", _arg(0, "path"))),
    },
}


def test_every_value_input_of_every_node_is_in_the_table(comfy) -> None:
    for node_id, node in comfy.nodes.items():
        schema = node.GET_NODE_INFO_V1()["input"]
        inputs = {**schema.get("required", {}), **schema.get("optional", {})}
        assert set(inputs) - SOCKETS == set(INPUTS[node_id]), node_id
    assert set(comfy.nodes) == set(INPUTS)


@pytest.fixture(scope="module")
def handles(comfy, handle) -> dict[str, Any]:
    tiny = comfy.module("fidesr_core.networks.tiny")
    restorer = comfy.module("fidesr_core.loading.restorer")
    base = tiny.tiny_base_model(seed=1)
    pisa = restorer.assemble_restorer(base, tiny.tiny_pisa_sr_weights(base, seed=4), precision="fp32", device="cpu")
    wrap = comfy.module("nodes.model_handle").FiDeSRModelHandle.wrap
    return {"fidesr": handle, "pisa-sr": wrap(pisa, base_name="tiny", weights_name="tiny")}


@pytest.fixture(scope="module")
def model_folders(comfy) -> Any:
    """Two tiny SD 2.1 diffusers folders and two FiDeSR weights files in the stand-in's model folders."""
    from ldm_export import write_diffusers_folder

    tiny = comfy.module("fidesr_core.networks.tiny")
    save = comfy.module("fidesr_core.loading.weights").save_restorer_weights
    base = tiny.tiny_base_model(seed=4)
    write_diffusers_folder(base, comfy.models_dir / "diffusers" / "tiny-a")
    shutil.copytree(comfy.models_dir / "diffusers" / "tiny-a", comfy.models_dir / "diffusers" / "tiny-b")
    (comfy.models_dir / "fidesr").mkdir(exist_ok=True)
    for name, seed in (("a.pkl", 5), ("b.pkl", 6)):
        save(tiny.tiny_fidesr_weights(base, seed=seed), comfy.models_dir / "fidesr" / name)
    return base


def _inputs(comfy, node_id: str, handles: dict, default_chain: dict, lq_image, family: str, base) -> dict[str, Any]:
    """The node's sockets connected, every value input at its default."""
    handle = handles[family]
    encoded = default_chain["encoded"]
    if family == "pisa-sr":
        (encoded,) = run_node(comfy, "FiDeSREncode", model=handle, image=lq_image)
    sockets = {
        "FiDeSREncode": {"model": handle, "image": lq_image},
        "FiDeSRResidual": {"model": handle, "latent": encoded},
        "FiDeSRLowFrequencyInject": {"latent": default_chain["refined"]},
        "FiDeSRHighFrequencyInject": {"latent": default_chain["refined"]},
        "FiDeSRDecode": {"model": handle, "latent": default_chain["hf"]},
        "FiDeSRUpscale": {"model": handle, "image": lq_image},
        "FiDeSRColorFix": {"image": default_chain["image"], "reference": lq_image},
        "FiDeSRModelLoader": {"base_model": "diffusers/tiny-a", "fidesr_weights": "a.pkl"},
        "FiDeSRModelFromCheckpoint": {"sd_model": stand_in_model(base), "fidesr_weights": "a.pkl"}
        | dict(zip(("clip", "vae"), clip_and_vae(base, lambda text: handle.model.prompt_embedding), strict=True)),
    }[node_id]
    schema = comfy.nodes[node_id].GET_NODE_INFO_V1()["input"]["required"]
    defaults = {name: spec[1]["default"] for name, spec in schema.items() if "default" in spec[1]}
    return defaults | sockets


def _spy(comfy, monkeypatch: pytest.MonkeyPatch, spy: tuple[str, str, Extract]) -> list[Any]:
    module_name, name, extract = spy
    module = comfy.module(module_name)
    real, received = getattr(module, name), []

    def recording(*args: Any, **kwargs: Any) -> Any:
        received.append(extract(args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return received


CASES = [(node_id, name) for node_id, inputs in INPUTS.items() for name in inputs]


@pytest.mark.parametrize(("node_id", "name"), CASES, ids=[f"{node}.{name}" for node, name in CASES])
def test_each_node_input_reaches_the_code_that_uses_it(
    comfy, handles, default_chain, lq_image, model_folders, monkeypatch, tmp_path, node_id: str, name: str
) -> None:
    changed, spy = INPUTS[node_id][name]
    family = "pisa-sr" if name.endswith(("pixel_strength", "semantic_strength")) else "fidesr"
    inputs = _inputs(comfy, node_id, handles, default_chain, lq_image, family, model_folders)
    if name == "positive":  # a CLIP Text Encode's CONDITIONING for the text
        dim = handles[family].cross_attention_dim
        changed = [[torch.randn((1, 77, dim), generator=torch.Generator().manual_seed(3)), {}]]
    received = _spy(comfy, monkeypatch, spy)
    restorer = comfy.module("fidesr_core.loading.restorer")
    with comfy_lora_and_config(restorer, model_folders, tmp_path) if "sd_model" in inputs else nullcontext():
        run_node(comfy, node_id, **inputs)
        default = list(received)
        received.clear()
        run_node(comfy, node_id, **(inputs | {name: changed}))
    expected = True if name == "positive" else changed
    if name in ("base_model", "fidesr_weights"):  # the node resolves the choice to a path in the model folder
        expected = str(comfy.models_dir / ("" if name == "base_model" else "fidesr") / changed)
        received[:], default[:] = [str(value) for value in received], [str(value) for value in default]
    assert expected in received and expected not in default, (received, default)


def test_the_tables_name_modules_of_the_pack() -> None:
    for inputs in INPUTS.values():
        for _, (module_name, _, _) in inputs.values():
            path = PACK_ROOT / (module_name.replace(".", "/") + ".py")
            assert path.is_file(), module_name


def test_the_vae_maps_follow_comfyuis_free_memory(comfy, handle, default_chain, monkeypatch) -> None:
    maps = comfy.module("fidesr_core.tiled_vae.maps")
    budgets = _spy(comfy, monkeypatch, ("fidesr_core.tiled_vae.codec", "decode_latents", lambda a, k: k["budget"]))
    real_file, files = maps.tempfile.TemporaryFile, []
    monkeypatch.setattr(maps.tempfile, "TemporaryFile", lambda *a, **k: files.append(1) or real_file(*a, **k))
    inputs = {"model": handle, "latent": default_chain["hf"], "color_fix": "adain", "tile_size": 4}
    images = {}
    for free in (64 << 30, 1 << 20):  # plenty, then less than the headroom: every map waits in a file
        monkeypatch.setattr(comfy.stub, "free_memory_bytes", free)
        files.clear()
        (images[free],) = run_node(comfy, "FiDeSRDecode", **inputs)
        assert budgets[-1].free_memory(torch.device("cpu")) == free  # asked of ComfyUI's memory manager
        assert bool(files) == (free < budgets[-1].host_headroom), free
    assert torch.equal(images[64 << 30], images[1 << 20])
