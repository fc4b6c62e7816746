"""The loader node with model files from elsewhere: a single-file base in ``checkpoints/`` and
weights written by the trainer, in both formats.  Shared fixtures in ``conftest.py``.
"""

from __future__ import annotations

import shutil

import torch
from ldm_export import write_config_folder, write_ldm_checkpoint
from node_helpers import loader_lists, run_node

from fidesr_core.networks.tiny import tiny_base_model
from fidesr_core.pipeline import upscale
from fidesr_core.settings import UpscaleSettings
from training.checkpoints import write_weights
from training.generator import build_generator


def _trained_looking_weights(folder, seed: int) -> list:
    """The trainer's own checkpoint writer, after its adapters and LRRB were moved off their zero init."""
    generator = build_generator(tiny_base_model(seed=seed), lora_rank=2)
    random = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in generator.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=random) * 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    return write_weights(generator, folder, ("pkl", "safetensors"), {"step": "7"})


def test_trained_checkpoints_and_a_single_file_base_load_in_the_node(comfy, tmp_path, monkeypatch, lq_image) -> None:
    base_module = comfy.module("fidesr_core.loading.base_model")
    # The bundled configs are SD 2.1-base's full size; the tiny single file converts with tiny ones.
    monkeypatch.setattr(
        base_module, "SD21_BASE_CONFIG_DIR", write_config_folder(tiny_base_model(seed=8), tmp_path / "cfg")
    )
    # The models folder is shared by the whole session: remove what this test adds to it.
    single_file = comfy.models_dir / "checkpoints" / "tiny-sd21.safetensors"
    run_folder = comfy.models_dir / "fidesr" / "run-step-7"
    single_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        _check_node_outputs(comfy, base_module, single_file, run_folder, lq_image)
    finally:
        single_file.unlink(missing_ok=True)
        shutil.rmtree(run_folder, ignore_errors=True)


def _check_node_outputs(comfy, base_module, single_file, run_folder, lq_image) -> None:
    write_ldm_checkpoint(tiny_base_model(seed=8), single_file)
    written = _trained_looking_weights(run_folder, seed=8)

    lists = loader_lists(comfy)
    assert "checkpoints/tiny-sd21.safetensors" in lists["base_model"]
    settings = UpscaleSettings(latent_mode="mode")
    outputs = []
    for path in written:
        name = f"run-step-7/{path.name}"
        assert name in lists["fidesr_weights"]
        (handle,) = run_node(
            comfy,
            "FiDeSRModelLoader",
            base_model="checkpoints/tiny-sd21.safetensors",
            fidesr_weights=name,
            precision="fp32",
        )
        (image,) = run_node(
            comfy,
            "FiDeSRUpscale",
            model=handle,
            image=lq_image,
            upscale_by=4.0,
            lf_strength=0.1,
            hf_strength=0.1,
            color_fix="adain",
            latent_mode="mode",
            seed=0,
            tile_size=96,
            tile_overlap=32,
        )
        outputs.append(image)
        expected = upscale(handle.model, lq_image.permute(0, 3, 1, 2), settings).permute(0, 2, 3, 1)
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)  # .pkl and .safetensors agree
    untrained = upscale(
        comfy.module("fidesr_core.loading.restorer").assemble_restorer(
            base_module.load_base_model(single_file),
            comfy.module("fidesr_core.networks.tiny").tiny_fidesr_weights(tiny_base_model(seed=8), rank=2, scale=0.0),
            precision="fp32",
            device="cpu",
        ),
        lq_image.permute(0, 3, 1, 2),
        settings,
    ).permute(0, 2, 3, 1)
    assert (outputs[0] - untrained).abs().max() > 1e-3  # the trained weights were really applied
