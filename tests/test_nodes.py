"""The ComfyUI nodes, run through the entry point ComfyUI calls, on tiny random models.

ComfyUI is not installed in CI: ``comfy_stub`` stands in for the few ComfyUI
modules the nodes import, and the pack is imported as ComfyUI imports it (by
file path, under a module name made from the path).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import logging
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from comfy_stub import InterruptProcessingException, import_pack, install_comfy_stubs, remove_from_sys_modules

PACK_ROOT = Path(__file__).resolve().parents[1]
CATEGORY = "image/upscaling/FiDeSR"

# The user-facing API from the issue: node id -> (display name, required inputs with defaults
# (None = no default), optional inputs, outputs).  Names and order must never change.
EXPECTED_NODES: dict[str, tuple[str, dict[str, Any], list[str], tuple[str, ...]]] = {
    "FiDeSRModelLoader": (
        "Load FiDeSR Model",
        {"base_model": None, "fidesr_weights": None, "precision": "auto"},
        [],
        ("FIDESR_MODEL",),
    ),
    "FiDeSREncode": (
        "FiDeSR VAE Encode",
        {"model": None, "image": None, "upscale_by": 4.0, "latent_mode": "sample", "seed": 0, "tile_size": 1024},
        [],
        ("LATENT",),
    ),
    "FiDeSRResidual": (
        "FiDeSR One-Step U-Net",
        {"model": None, "latent": None, "tile_size": 96, "tile_overlap": 32},
        ["positive"],
        ("LATENT",),
    ),
    "FiDeSRRefine": ("FiDeSR LRRB Refine", {"model": None, "latent": None}, [], ("LATENT",)),
    "FiDeSRLowFrequencyInject": (
        "FiDeSR LF Injection",
        {
            "latent": None,
            "strength": 0.1,
            "cutoff": 0.10,
            "order": 2,
            "channel_tau": 0.8,
            "channel_sharpness": 10.0,
            "gamma": 1.2,
            "filter": "official",
        },
        [],
        ("LATENT",),
    ),
    "FiDeSRHighFrequencyInject": (
        "FiDeSR HF Injection",
        {
            "latent": None,
            "strength": 0.1,
            "cutoff": 0.32,
            "order": 2,
            "gamma": 1.2,
            "channel_cutoff": 0.10,
            "channel_tau": 0.8,
            "channel_sharpness": 10.0,
            "filter": "official",
        },
        [],
        ("LATENT",),
    ),
    "FiDeSRDecode": (
        "FiDeSR VAE Decode",
        {"model": None, "latent": None, "color_fix": "adain", "tile_size": 224},
        [],
        ("IMAGE",),
    ),
    "FiDeSRUpscale": (
        "FiDeSR Upscale",
        {
            "model": None,
            "image": None,
            "upscale_by": 4.0,
            "lf_strength": 0.1,
            "hf_strength": 0.1,
            "color_fix": "adain",
            "latent_mode": "sample",
            "seed": 0,
            "tile_size": 96,
            "tile_overlap": 32,
        },
        ["positive"],
        ("IMAGE",),
    ),
    "FiDeSRColorFix": (
        "FiDeSR Color Fix",
        {"image": None, "reference": None, "method": "adain"},
        [],
        ("IMAGE",),
    ),
}
EXPECTED_COMBOS = {
    ("FiDeSRModelLoader", "precision"): ["auto", "fp32", "fp16", "bf16"],
    ("FiDeSREncode", "latent_mode"): ["sample", "mode"],
    ("FiDeSRDecode", "color_fix"): ["adain", "wavelet", "none"],
    ("FiDeSRUpscale", "color_fix"): ["adain", "wavelet", "none"],
    ("FiDeSRUpscale", "latent_mode"): ["sample", "mode"],
    ("FiDeSRLowFrequencyInject", "filter"): ["official", "radial"],
    ("FiDeSRHighFrequencyInject", "filter"): ["official", "radial"],
    ("FiDeSRColorFix", "method"): ["adain", "wavelet"],
}
SOCKET_TYPES = {
    "model": "FIDESR_MODEL",
    "image": "IMAGE",
    "reference": "IMAGE",
    "latent": "LATENT",
    "positive": "CONDITIONING",
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    """Stub ComfyUI modules plus the pack imported the way ComfyUI imports it."""
    models_dir = tmp_path_factory.mktemp("models")
    stub = install_comfy_stubs(models_dir)
    threads = torch.get_num_threads()
    # The tiny networks are too small to gain from threads, and on a busy CI machine threads that
    # wait for each other make them several times slower.
    torch.set_num_threads(1)
    try:
        pack = import_pack(PACK_ROOT)

        def module(relative: str) -> ModuleType:
            return importlib.import_module(f"{pack.__name__}.{relative}")

        yield SimpleNamespace(stub=stub, pack=pack, module=module, models_dir=models_dir)
    finally:
        torch.set_num_threads(threads)
        remove_from_sys_modules(PACK_ROOT)


@pytest.fixture(autouse=True)
def _fresh_records(request: pytest.FixtureRequest) -> None:
    if "comfy" in request.fixturenames:
        request.getfixturevalue("comfy").stub.reset_records()


@pytest.fixture(scope="module")
def handle(comfy):
    """A FIDESR_MODEL around a tiny random FiDeSR model (fp32, CPU)."""
    tiny = comfy.module("fidesr_core.tiny")
    loading = comfy.module("fidesr_core.loading")
    base = tiny.tiny_base_model(seed=1)
    weights = tiny.tiny_fidesr_weights(base, seed=2)
    model = loading.assemble_fidesr_model(base, weights, precision="fp32", device="cpu")
    model_handle = comfy.module("nodes.model_handle")
    return model_handle.FiDeSRModelHandle(
        model=model,
        load_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        base_name="tiny",
        weights_name="tiny",
    )


@pytest.fixture(scope="module")
def lq_images() -> torch.Tensor:
    """ComfyUI IMAGE [2, 32, 32, 3]; pre-scaled to 128 px (the min-side rule), so latents are 64 x 64.

    The tiny U-Net's attention makes whole 64 x 64 latents the slow part: most tests use one image.
    """
    generator = torch.Generator().manual_seed(7)
    return torch.rand((2, 32, 32, 3), generator=generator)


@pytest.fixture(scope="module")
def lq_image(lq_images: torch.Tensor) -> torch.Tensor:
    return lq_images[:1]


def run_node(comfy, node_id: str, **inputs: Any) -> tuple:
    """Call a node as ComfyUI's executor does: a fresh instance, its FUNCTION, under inference mode."""
    node_class = comfy.pack.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        return getattr(node_class(), node_class.FUNCTION)(**inputs)


def chain(comfy, handle, image: torch.Tensor, *, injections: bool = True, **overrides: Any) -> dict[str, Any]:
    """Encode -> One-Step U-Net -> LRRB -> LF -> HF -> Decode; every intermediate output."""
    encode = {"upscale_by": 4.0, "latent_mode": "sample", "seed": 0, "tile_size": 1024} | overrides.get("encode", {})
    residual = {"tile_size": 96, "tile_overlap": 32} | overrides.get("residual", {})
    out: dict[str, Any] = {}
    (out["encoded"],) = run_node(comfy, "FiDeSREncode", model=handle, image=image, **encode)
    (out["residual"],) = run_node(comfy, "FiDeSRResidual", model=handle, latent=out["encoded"], **residual)
    (out["refined"],) = run_node(comfy, "FiDeSRRefine", model=handle, latent=out["residual"])
    latent = out["refined"]
    if injections:
        (out["lf"],) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=latent, **overrides.get("lf", {}))
        (latent,) = run_node(comfy, "FiDeSRHighFrequencyInject", latent=out["lf"], **overrides.get("hf", {}))
        out["hf"] = latent
    (out["image"],) = run_node(comfy, "FiDeSRDecode", model=handle, latent=latent, color_fix="adain", tile_size=224)
    return out


@pytest.fixture(scope="module")
def default_chain(comfy, handle, lq_image) -> dict[str, Any]:
    return chain(comfy, handle, lq_image)


# ----------------------------------------------------------------------------- import and definitions


def test_pack_imports_by_file_path_under_a_mangled_name(comfy) -> None:
    pack = comfy.pack
    assert pack.__name__ == str(PACK_ROOT).replace(".", "_x_")
    assert set(pack.NODE_CLASS_MAPPINGS) == set(EXPECTED_NODES)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {node_id: spec[0] for node_id, spec in EXPECTED_NODES.items()}
    # The engine the nodes use is the pack's own copy, reached by relative imports.
    engine = comfy.module("fidesr_core.pipeline")
    assert engine.__name__ == f"{pack.__name__}.fidesr_core.pipeline"


def _absolute_imports_of_pack_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        found += [name for name in names if name.split(".")[0] in ("nodes", "fidesr_core", "training", "tests")]
    return found


def test_every_import_inside_the_pack_is_relative() -> None:
    # In ComfyUI "nodes" is ComfyUI's own nodes.py and the pack has no importable name of its own.
    files = [PACK_ROOT / "__init__.py", *sorted((PACK_ROOT / "nodes").glob("*.py"))]
    offending = {str(path.relative_to(PACK_ROOT)): _absolute_imports_of_pack_modules(path) for path in files}
    assert {path: names for path, names in offending.items() if names} == {}


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_node_definition_matches_the_published_api(comfy, node_id: str) -> None:
    node_class = comfy.pack.NODE_CLASS_MAPPINGS[node_id]
    _, required, optional, outputs = EXPECTED_NODES[node_id]
    inputs = node_class.INPUT_TYPES()
    assert set(inputs) <= {"required", "optional"}
    assert list(inputs["required"]) == list(required)
    assert list(inputs.get("optional", {})) == optional
    assert tuple(node_class.RETURN_TYPES) == outputs
    assert node_class.CATEGORY == CATEGORY
    assert isinstance(node_class.DESCRIPTION, str) and len(node_class.DESCRIPTION) > 40
    assert len(node_class.OUTPUT_TOOLTIPS) == len(outputs)
    for name, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
        options = spec[1]
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if name in SOCKET_TYPES:
            assert spec[0] == SOCKET_TYPES[name]
        elif required.get(name) is not None:
            assert options.get("default", spec[0][0] if isinstance(spec[0], list) else None) == required[name]
        if (node_id, name) in EXPECTED_COMBOS:
            assert spec[0] == EXPECTED_COMBOS[(node_id, name)]
        if spec[0] in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"]
    function = getattr(node_class, node_class.FUNCTION)
    parameters = list(inspect.signature(function).parameters)
    assert parameters == ["self", *required, *optional]
    json.dumps(inputs)  # /object_info must be able to serialise it


def test_node_defaults_are_the_engines_defaults(comfy) -> None:
    injection = comfy.module("fidesr_core.injection")
    pipeline = comfy.module("fidesr_core.pipeline")
    mappings = comfy.pack.NODE_CLASS_MAPPINGS

    def defaults(node_id: str) -> dict[str, Any]:
        required = mappings[node_id].INPUT_TYPES()["required"]
        return {name: spec[1]["default"] for name, spec in required.items() if "default" in spec[1]}

    low, high, settings = (
        injection.LowFrequencySettings(),
        injection.HighFrequencySettings(),
        pipeline.UpscaleSettings(),
    )
    for name, value in defaults("FiDeSRLowFrequencyInject").items():
        assert getattr(low, name) == value, name
    for name, value in defaults("FiDeSRHighFrequencyInject").items():
        assert getattr(high, name) == value, name
    assert defaults("FiDeSREncode")["tile_size"] == settings.encode_tile_size
    assert defaults("FiDeSRDecode")["tile_size"] == settings.decode_tile_size
    upscale = defaults("FiDeSRUpscale")
    assert (upscale["tile_size"], upscale["tile_overlap"]) == (settings.tile_size, settings.tile_overlap)
    assert (upscale["lf_strength"], upscale["hf_strength"]) == (low.strength, high.strength)
    assert (upscale["latent_mode"], upscale["seed"], upscale["color_fix"]) == (
        settings.latent_mode,
        settings.seed,
        settings.color_fix,
    )


# ----------------------------------------------------------------------------- the chain


def test_chain_equals_fidesr_upscale_and_the_engine_pipeline(comfy, handle, lq_image, default_chain) -> None:
    (one_node,) = run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_image)
    assert torch.equal(one_node, default_chain["image"])
    assert one_node.shape == (1, 128, 128, 3) and one_node.dtype == torch.float32
    assert 0.0 <= one_node.min() and one_node.max() <= 1.0
    pipeline = comfy.module("fidesr_core.pipeline")
    with torch.inference_mode():
        engine = pipeline.upscale(handle.model, lq_image.permute(0, 3, 1, 2), pipeline.UpscaleSettings())
    torch.testing.assert_close(one_node, engine.permute(0, 2, 3, 1), atol=2e-5, rtol=0)


def test_chain_with_tiling_batch_and_strengths_equals_fidesr_upscale(comfy, handle, lq_images) -> None:
    settings = {"upscale_by": 3.0, "latent_mode": "mode", "seed": 5, "tile_size": 48, "tile_overlap": 16}
    image = lq_images
    overrides = {
        "encode": {"upscale_by": 3.0, "latent_mode": "mode", "seed": 5},
        "residual": {"tile_size": 48, "tile_overlap": 16},
        "lf": {"strength": 0.3},
        "hf": {"strength": 0.0},
    }
    chained = chain(comfy, handle, image, **overrides)
    (one_node,) = run_node(
        comfy, "FiDeSRUpscale", model=handle, image=image, lf_strength=0.3, hf_strength=0.0, **settings
    )
    assert torch.equal(one_node, chained["image"])
    assert one_node.shape == (2, 96, 96, 3)
    assert not torch.allclose(one_node[0], one_node[1])


def test_latent_is_a_comfyui_latent_of_unscaled_vae_latents(comfy, handle, lq_image) -> None:
    (latent,) = run_node(comfy, "FiDeSREncode", model=handle, image=lq_image, latent_mode="mode")
    samples = latent["samples"]
    assert samples.shape == (1, 4, 64, 64) and samples.dtype == torch.float32 and samples.device.type == "cpu"
    # What ComfyUI's VAEEncode would give: the plain VAE posterior mode of the network input.
    preprocess = comfy.module("fidesr_core.preprocess")
    pixels = preprocess.prepare_lq(lq_image.permute(0, 3, 1, 2), upscale_by=4.0).pixels
    with torch.inference_mode():
        mode = handle.model.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(samples, mode, atol=1e-4, rtol=1e-4)
    state = latent["fidesr"]
    torch.testing.assert_close(state.z_lq, mode * handle.model.scaling_factor, atol=1e-4, rtol=1e-4)
    assert state.output_size == (128, 128) and state.upscaled_lq.shape == (1, 3, 512, 512)


def test_each_step_outputs_what_the_issue_specifies(comfy, handle, default_chain) -> None:
    sf = handle.model.scaling_factor
    state = default_chain["refined"]["fidesr"]
    z_lq, r, r_tilde = state.z_lq, state.residual, state.refined_residual
    assert default_chain["residual"]["fidesr"].refined_residual is None
    torch.testing.assert_close(default_chain["encoded"]["samples"] * sf, z_lq)
    torch.testing.assert_close(default_chain["residual"]["samples"] * sf, z_lq - r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(default_chain["refined"]["samples"] * sf, z_lq - r_tilde, atol=1e-5, rtol=1e-5)
    restoration = comfy.module("fidesr_core.restoration")
    with torch.inference_mode():
        expected_refined = restoration.refine_residual(handle.model, z_lq, r)
    torch.testing.assert_close(r_tilde, expected_refined)
    assert not torch.allclose(r_tilde, r)  # the tiny LRRB is not zero
    assert default_chain["hf"]["fidesr"].injections == ("lf", "hf")


def test_injections_commute_and_add_their_engine_deltas(comfy, handle, default_chain) -> None:
    refined = default_chain["refined"]
    (hf_first,) = run_node(comfy, "FiDeSRHighFrequencyInject", latent=refined, strength=0.2)
    (both,) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=hf_first, strength=0.3)
    (lf_first,) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=refined, strength=0.3)
    (both_other_order,) = run_node(comfy, "FiDeSRHighFrequencyInject", latent=lf_first, strength=0.2)
    torch.testing.assert_close(both["samples"], both_other_order["samples"], atol=1e-6, rtol=0)
    injection = comfy.module("fidesr_core.injection")
    state = refined["fidesr"]
    z = state.z_lq - state.refined_residual
    gate = injection.spatial_gate(state.upscaled_lq, tuple(z.shape[-2:]))
    expected = injection.inject_frequencies(
        z,
        state.z_lq,
        gate,
        injection.LowFrequencySettings(strength=0.3),
        injection.HighFrequencySettings(strength=0.2),
    )
    torch.testing.assert_close(both["samples"] * handle.model.scaling_factor, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both["samples"], refined["samples"])


def test_positive_conditioning_replaces_the_empty_prompt(comfy, handle, default_chain) -> None:
    encoded = default_chain["encoded"]
    empty = [[handle.model.prompt_embedding.clone(), {"pooled_output": None}]]
    (with_empty,) = run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, positive=empty)
    assert torch.equal(with_empty["samples"], default_chain["residual"]["samples"])
    generator = torch.Generator().manual_seed(3)
    prompt = [[torch.randn((1, 77, handle.cross_attention_dim), generator=generator), {}]]
    (with_prompt,) = run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, positive=prompt)
    assert not torch.allclose(with_prompt["samples"], with_empty["samples"])


def test_color_fix_node_resizes_the_reference_and_broadcasts_it(comfy, lq_image, default_chain) -> None:
    image = torch.cat([default_chain["image"], default_chain["image"].flip(1)])  # a batch of 2
    (fixed,) = run_node(comfy, "FiDeSRColorFix", image=image, reference=lq_image, method="adain")
    assert fixed.shape == image.shape
    color_fix = comfy.module("fidesr_core.color_fix")
    preprocess = comfy.module("fidesr_core.preprocess")
    reference = preprocess.resize_image(lq_image.permute(0, 3, 1, 2), (128, 128)).expand(2, -1, -1, -1)
    expected = color_fix.apply_color_fix(image.permute(0, 3, 1, 2), reference, "adain").permute(0, 2, 3, 1)
    torch.testing.assert_close(fixed, expected)
    (wavelet,) = run_node(comfy, "FiDeSRColorFix", image=image, reference=lq_image, method="wavelet")
    assert wavelet.shape == image.shape and not torch.allclose(wavelet, fixed)


# ----------------------------------------------------------------------------- errors


def _error_of(comfy, node_id: str, **inputs: Any) -> str:
    errors = comfy.module("nodes.errors")
    with pytest.raises(errors.FiDeSRNodeError) as caught:
        run_node(comfy, node_id, **inputs)
    return str(caught.value)


def test_plain_latent_into_a_fidesr_node_names_the_node_to_connect(comfy, handle) -> None:
    plain = {"samples": torch.zeros((1, 4, 8, 8))}
    message = _error_of(comfy, "FiDeSRLowFrequencyInject", latent=plain)
    assert message.startswith("FiDeSR LF Injection: the latent has no FiDeSR state")
    assert "FiDeSR LRRB Refine" in message
    message = _error_of(comfy, "FiDeSRResidual", model=handle, latent=plain, tile_size=96, tile_overlap=32)
    assert message.startswith("FiDeSR One-Step U-Net:") and "FiDeSR VAE Encode" in message
    message = _error_of(comfy, "FiDeSRDecode", model=handle, latent=plain, color_fix="adain", tile_size=224)
    assert message.startswith("FiDeSR VAE Decode:") and "VAE Decode" in message


def test_state_that_no_longer_matches_samples_is_refused(comfy, handle, default_chain) -> None:
    resized = dict(default_chain["refined"])
    resized["samples"] = torch.nn.functional.interpolate(resized["samples"], scale_factor=2.0)
    message = _error_of(comfy, "FiDeSRHighFrequencyInject", latent=resized)
    assert message.startswith("FiDeSR HF Injection:") and "[1, 4, 128, 128]" in message and "[1, 4, 64, 64]" in message
    samples = default_chain["refined"]["samples"]
    rebatched = dict(default_chain["refined"], samples=torch.cat([samples, samples]))
    message = _error_of(comfy, "FiDeSRDecode", model=handle, latent=rebatched, color_fix="none", tile_size=224)
    assert message.startswith("FiDeSR VAE Decode:") and "batch" in message


def test_steps_out_of_order_are_refused(comfy, handle, default_chain) -> None:
    message = _error_of(comfy, "FiDeSRLowFrequencyInject", latent=default_chain["encoded"])
    assert "has not been through FiDeSR One-Step U-Net" in message
    message = _error_of(comfy, "FiDeSRRefine", model=handle, latent=default_chain["encoded"])
    assert message.startswith("FiDeSR LRRB Refine:") and "One-Step U-Net" in message
    (injected_unrefined,) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=default_chain["residual"])
    message = _error_of(comfy, "FiDeSRRefine", model=handle, latent=injected_unrefined)
    assert "put FiDeSR LRRB Refine before FiDeSR LF Injection" in message
    message = _error_of(comfy, "FiDeSRRefine", model=handle, latent=default_chain["refined"])
    assert "already went through FiDeSR LRRB Refine" in message
    message = _error_of(
        comfy, "FiDeSRResidual", model=handle, latent=default_chain["residual"], tile_size=96, tile_overlap=32
    )
    assert "already went through FiDeSR One-Step U-Net" in message


def test_bad_values_are_reported_with_node_value_and_expectation(comfy, handle, lq_image, default_chain) -> None:
    message = _error_of(
        comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=32, tile_overlap=32
    )
    assert message == "FiDeSR One-Step U-Net: tile_overlap 32 must be smaller than tile_size 32"
    wrong_clip = [[torch.zeros((1, 77, 768)), {}]]
    message = _error_of(
        comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=96, positive=wrong_clip
    )
    assert message.startswith("FiDeSR One-Step U-Net: positive is a [1, 77, 768] embedding") and "CLIP" in message
    # An engine error (SettingsError) is re-raised under the node's name.
    message = _error_of(comfy, "FiDeSREncode", model=handle, image=lq_image, upscale_by=20.0)
    assert message.startswith("FiDeSR VAE Encode:") and "upscale_by" in message and "20" in message
    message = _error_of(comfy, "FiDeSRColorFix", image=lq_image, reference=lq_image[:1].expand(3, -1, -1, -1))
    assert message.startswith("FiDeSR Color Fix: reference has a batch of 3")
    message = _error_of(comfy, "FiDeSRUpscale", model="not a model", image=lq_image)
    assert message.startswith("FiDeSR Upscale: model must come from Load FiDeSR Model")


# ----------------------------------------------------------------------------- ComfyUI citizenship


def test_progress_per_tile_and_memory_requests(comfy, handle, default_chain) -> None:
    stub = comfy.stub
    run_node(comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=48, tile_overlap=16)
    # A 64 x 64 latent in 48-px tiles with stride 32: 2 rows x 2 columns.
    assert stub.progress == [(done, 4) for done in range(1, 5)]
    assert stub.progress_bars == 1
    assert stub.free_memory_calls and all(device == torch.device("cpu") for _, device in stub.free_memory_calls)
    assert stub.free_memory_calls[0][0] > 0
    assert stub.interrupt_checks >= 4  # checked before every tile


def test_interrupt_between_tiles_raises_comfyuis_exception(comfy, handle, default_chain) -> None:
    stub = comfy.stub
    stub.interrupt_after_checks = 3
    with pytest.raises(InterruptProcessingException):
        run_node(comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=48, tile_overlap=16)
    assert len(stub.progress) == 2  # two tiles finished, then the interrupt
    assert handle.active_users == 0


def test_out_of_memory_retries_once_with_half_the_tile(comfy, handle, default_chain, monkeypatch, caplog) -> None:
    restoration_nodes = comfy.module("nodes.restoration_nodes")
    encoded = default_chain["encoded"]
    residual = torch.full_like(encoded["samples"], 0.5)
    tiles: list[tuple[int, int]] = []

    def predict_running_out_once(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tiles.append((kwargs["tile_size"], kwargs["tile_overlap"]))
        if len(tiles) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return residual

    monkeypatch.setattr(restoration_nodes, "predict_residual", predict_running_out_once)
    with caplog.at_level(logging.WARNING, logger="FiDeSR"):
        (latent,) = run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, tile_size=64, tile_overlap=16)
    assert tiles == [(64, 16), (32, 8)]
    assert "FiDeSR One-Step U-Net: out of memory with tile_size 64; retrying once with tile_size 32" in caplog.text
    assert comfy.stub.soft_empty_cache_calls >= 1
    assert torch.equal(latent["fidesr"].residual, residual)  # the retry's result is used

    def always_out_of_memory(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tiles.append((kwargs["tile_size"], kwargs["tile_overlap"]))
        raise torch.OutOfMemoryError("CUDA out of memory")

    tiles.clear()
    monkeypatch.setattr(restoration_nodes, "predict_residual", always_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, tile_size=0, tile_overlap=0)
    assert tiles == [(0, 0), (32, 0)]  # 0 = untiled; the retry halves the latent's 64-px side

    def other_error(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tiles.append((kwargs["tile_size"], kwargs["tile_overlap"]))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    tiles.clear()
    monkeypatch.setattr(restoration_nodes, "predict_residual", other_error)
    with pytest.raises(RuntimeError, match="mat1"):
        run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, tile_size=32, tile_overlap=8)
    assert tiles == [(32, 8)]  # no retry for errors other than out-of-memory


def test_model_moves_to_the_torch_device_only_while_running(comfy, handle, lq_image, monkeypatch) -> None:
    moves: list[str] = []
    fake_offload = torch.device("cpu", 1)  # a distinct device object; the recorder does not really move
    monkeypatch.setattr(handle, "offload_device", fake_offload)
    monkeypatch.setattr(handle.model, "to", lambda device: moves.append(str(device)) or handle.model)
    run_node(comfy, "FiDeSREncode", model=handle, image=lq_image, latent_mode="mode")
    assert moves == ["cpu", "cpu:1"]
    moves.clear()
    run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_image, lf_strength=0.0, hf_strength=0.0, tile_size=0)
    assert moves == ["cpu", "cpu:1"]  # one round trip for the whole one-node run
    assert handle.active_users == 0


def test_outside_comfyui_the_pack_exports_no_nodes(monkeypatch) -> None:
    # pytest (and other tools) import the repository's __init__.py as a package without ComfyUI.
    import importlib.util
    import sys

    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    spec = importlib.util.spec_from_file_location("fidesr_pack_without_comfyui", PACK_ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}


# ----------------------------------------------------------------------------- the loader


def _write_diffusers_folder(base: Any, folder: Path, config_dir: Path) -> None:
    folder.mkdir(parents=True)
    base.unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    base.text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text((config_dir / "model_index.json").read_text())
    (folder / "scheduler").mkdir()
    scheduler = (config_dir / "scheduler" / "scheduler_config.json").read_text()
    (folder / "scheduler" / "scheduler_config.json").write_text(scheduler)


@pytest.fixture(scope="module")
def model_files(comfy) -> SimpleNamespace:
    """A tiny SD 2-shaped diffusers folder and FiDeSR weights for it, in the stub's model folders."""
    tiny = comfy.module("fidesr_core.tiny")
    base = tiny.tiny_base_model(seed=4)
    weights = tiny.tiny_fidesr_weights(base, seed=5)
    config_dir = PACK_ROOT / "fidesr_core" / "configs" / "sd21_base"
    _write_diffusers_folder(base, comfy.models_dir / "diffusers" / "tiny-sd21", config_dir)
    (comfy.models_dir / "fidesr").mkdir(exist_ok=True)
    save_fidesr_weights = comfy.module("fidesr_core.weights").save_fidesr_weights
    save_fidesr_weights(weights, comfy.models_dir / "fidesr" / "fidesr-tiny.pkl")  # the authors' layout
    save_fidesr_weights(weights, comfy.models_dir / "fidesr" / "tiny.safetensors")
    (comfy.models_dir / "fidesr" / "corrupt.pkl").write_bytes(b"\x80\x04this is not a torch file" * 10)
    (comfy.models_dir / "fidesr" / "readme.txt").write_text("not weights")
    return SimpleNamespace(base_seed=4, weights=weights)


def test_loader_lists_model_files_with_stable_prefixed_names(comfy, model_files) -> None:
    checkpoints = comfy.models_dir / "checkpoints" / "sd2"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "v2-1_512-ema-pruned.safetensors").write_bytes(b"")
    required = comfy.pack.NODE_CLASS_MAPPINGS["FiDeSRModelLoader"].INPUT_TYPES()["required"]
    assert required["base_model"][0] == ["diffusers/tiny-sd21", "checkpoints/sd2/v2-1_512-ema-pruned.safetensors"]
    assert required["fidesr_weights"][0] == ["corrupt.pkl", "fidesr-tiny.pkl", "tiny.safetensors"]  # no .txt


def test_loader_combos_load_with_empty_model_folders(comfy, tmp_path, monkeypatch) -> None:
    names = comfy.stub.folder_names_and_paths
    for folder in ("checkpoints", "diffusers", "fidesr"):
        monkeypatch.setitem(names, folder, ([str(tmp_path / folder)], names[folder][1]))
    required = comfy.pack.NODE_CLASS_MAPPINGS["FiDeSRModelLoader"].INPUT_TYPES()["required"]
    assert required["base_model"][0] == [] and required["fidesr_weights"][0] == []


def test_extra_model_paths_are_kept_and_listed(comfy, model_files, tmp_path, monkeypatch) -> None:
    model_folders = comfy.module("nodes.model_folders")
    names = comfy.stub.folder_names_and_paths
    default_fidesr = str(comfy.models_dir / "fidesr")
    extra = {folder: tmp_path / folder for folder in ("fidesr", "diffusers", "checkpoints")}
    for path in extra.values():
        path.mkdir()
    # What extra_model_paths.yaml does before ComfyUI imports custom nodes: a 'fidesr' entry with no extensions.
    monkeypatch.setitem(names, "fidesr", ([str(extra["fidesr"])], set()))
    monkeypatch.setitem(names, "diffusers", (names["diffusers"][0] + [str(extra["diffusers"])], names["diffusers"][1]))
    monkeypatch.setitem(
        names, "checkpoints", (names["checkpoints"][0] + [str(extra["checkpoints"])], names["checkpoints"][1])
    )
    model_folders.register_fidesr_folder()
    paths, extensions = names["fidesr"]
    assert paths == [str(extra["fidesr"]), default_fidesr] and {".pkl", ".safetensors"} <= set(extensions)
    (extra["fidesr"] / "other.safetensors").write_bytes(b"")
    (extra["diffusers"] / "sd21" / "unet").mkdir(parents=True)
    (extra["diffusers"] / "sd21" / "model_index.json").write_text("{}")
    (extra["checkpoints"] / "extra.safetensors").write_bytes(b"")
    required = comfy.pack.NODE_CLASS_MAPPINGS["FiDeSRModelLoader"].INPUT_TYPES()["required"]
    assert "other.safetensors" in required["fidesr_weights"][0] and "fidesr-tiny.pkl" in required["fidesr_weights"][0]
    assert {"diffusers/sd21", "diffusers/tiny-sd21", "checkpoints/extra.safetensors"} <= set(required["base_model"][0])
    assert model_folders.resolve_base_model("diffusers/sd21", "node") == str(extra["diffusers"] / "sd21")
    assert model_folders.resolve_fidesr_weights("other.safetensors", "node") == str(
        extra["fidesr"] / "other.safetensors"
    )
    model_folders.register_fidesr_folder()  # idempotent
    assert names["fidesr"][0] == [str(extra["fidesr"]), default_fidesr]


def test_loader_builds_the_model_with_comfyuis_precision(comfy, model_files) -> None:
    comfy.stub.unet_dtype = torch.bfloat16  # as ComfyUI would choose on a bf16 GPU, or with --bf16-unet
    try:
        (handle,) = run_node(
            comfy, "FiDeSRModelLoader", base_model="diffusers/tiny-sd21", fidesr_weights="fidesr-tiny.pkl"
        )
    finally:
        comfy.stub.unet_dtype = torch.float32
    assert handle.dtype == torch.bfloat16 and next(handle.model.unet.parameters()).dtype == torch.bfloat16
    assert handle.load_device == comfy.stub.torch_device and handle.offload_device == comfy.stub.offload_device
    (fp32,) = run_node(
        comfy,
        "FiDeSRModelLoader",
        base_model="diffusers/tiny-sd21",
        fidesr_weights="fidesr-tiny.pkl",
        precision="fp32",
    )
    assert fp32.dtype == torch.float32
    # The same networks as assembling the tiny model and weights directly.
    tiny = comfy.module("fidesr_core.tiny")
    loading = comfy.module("fidesr_core.loading")
    direct = loading.assemble_fidesr_model(
        tiny.tiny_base_model(seed=model_files.base_seed), model_files.weights, precision="fp32", device="cpu"
    )
    torch.testing.assert_close(fp32.model.prompt_embedding, direct.prompt_embedding)
    for loaded, expected in zip(fp32.model.unet.parameters(), direct.unet.parameters(), strict=True):
        torch.testing.assert_close(loaded, expected)
    for loaded, expected in zip(fp32.model.lrrb.parameters(), direct.lrrb.parameters(), strict=True):
        torch.testing.assert_close(loaded, expected)
    (from_safetensors,) = run_node(
        comfy,
        "FiDeSRModelLoader",
        base_model="diffusers/tiny-sd21",
        fidesr_weights="tiny.safetensors",
        precision="fp32",
    )
    for loaded, expected in zip(from_safetensors.model.unet.parameters(), direct.unet.parameters(), strict=True):
        torch.testing.assert_close(loaded, expected)


def test_loader_reports_bad_files_on_the_node(comfy, model_files) -> None:
    message = _error_of(
        comfy, "FiDeSRModelLoader", base_model="diffusers/tiny-sd21", fidesr_weights="corrupt.pkl", precision="fp32"
    )
    assert message.startswith("Load FiDeSR Model:") and "corrupt.pkl" in message
    message = _error_of(
        comfy, "FiDeSRModelLoader", base_model="diffusers/missing", fidesr_weights="fidesr-tiny.pkl", precision="fp32"
    )
    assert message.startswith("Load FiDeSR Model: base_model 'diffusers/missing'") and "model_index.json" in message
    message = _error_of(
        comfy, "FiDeSRModelLoader", base_model="sd21.safetensors", fidesr_weights="fidesr-tiny.pkl", precision="fp32"
    )
    assert "checkpoints/<file>" in message
    message = _error_of(
        comfy, "FiDeSRModelLoader", base_model="diffusers/tiny-sd21", fidesr_weights="nope.pkl", precision="fp32"
    )
    assert message.startswith("Load FiDeSR Model: fidesr_weights 'nope.pkl' is not in the fidesr model folders")
